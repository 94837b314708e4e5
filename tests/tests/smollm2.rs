//! The one real pretrained model we can install: SmolLM2-135M-Instruct (GGUF, Q4_1), with the
//! tokenizer and chat template its metadata carries.

use std::ops::ControlFlow;

use burn::tensor::Device;
use integration_tests::smollm2_gguf;
use llama_burn::gguf::GgufFile;
use llama_burn::{
    ChatTemplate, Llama, LoadOptions, Message, Role, SamplingConfig, Tokenizer, generate,
};

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(path) = smollm2_gguf() else { return };
    let device = Device::flex();
    let (model, config) = Llama::from_gguf(&path, &LoadOptions::default(), &device).unwrap();
    assert_eq!(
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_kv_heads()
        ),
        (30, 576, 3)
    );
    assert!(config.tie_word_embeddings);

    let file = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_ne!(Some(tokenizer.pad_id()), tokenizer.eos_id, "pad is not EOS");
    let round_trip = tokenizer
        .decode(&tokenizer.encode("Hello, world! 2024").unwrap())
        .unwrap();
    assert_eq!(round_trip, "Hello, world! 2024");

    let jinja = file.metadata["tokenizer.chat_template"].as_str().unwrap();
    let template = ChatTemplate::from_jinja(jinja).expect("ChatML");
    let prompt = template.render(
        &[Message::new(Role::User, "What is the capital of France?")],
        true,
    );
    let ids = tokenizer.encode(&prompt).unwrap();
    assert_eq!(
        ids[0], 1,
        "the prompt starts with <|im_start|> as one token"
    );
    let sampling = SamplingConfig::new().with_max_new_tokens(24);
    let answer = generate(&model, &config, &ids, sampling, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let answer = tokenizer.decode(&answer).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

/// The tokenizer files `merge` writes for a GGUF model: `tokenizer.json` encodes as the GGUF's
/// tokenizer does, and `tokenizer_config.json` names its special tokens and chat template.
#[test]
fn gguf_tokenizer_files_for_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let dir = std::env::temp_dir().join(format!("smollm2-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    llama_burn::save_tokenizer_files(&path, &dir, 8192).unwrap();

    let written = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(1), Some(2)).unwrap();
    let text = "<|im_start|>user\nHow many r's in 'strawberry'? 12345 ünïcode 🦀<|im_end|>\n";
    assert_eq!(
        written.encode(text).unwrap(),
        tokenizer.encode(text).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(
        config["chat_template"].as_str(),
        file.metadata["tokenizer.chat_template"].as_str()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
