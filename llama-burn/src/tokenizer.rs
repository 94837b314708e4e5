use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::LlamaError;
use crate::gguf::{GgufFile, GgufValue};
use crate::save::write_file;

/// Text to token ids and back, through the `tokenizers` crate, with the model's special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    /// The model's Jinja chat template, when its tokenizer source carries one (GGUF).
    chat_template: Option<String>,
}

/// The tokenizer files of a Hugging Face checkpoint, copied as they are when merging.
const HF_TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

fn tokenizer_error(err: impl std::fmt::Display) -> LlamaError {
    LlamaError::Tokenizer(err.to_string())
}

impl Tokenizer {
    /// A Hugging Face `tokenizer.json`, with the model's BOS and EOS ids (from its config).
    pub fn from_file(
        path: &Path,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self, LlamaError> {
        if !path.is_file() {
            return Err(LlamaError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer file"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|err| LlamaError::Tokenizer(format!("{}: {err}", path.display())))?;
        let unk_id = ["<unk>", "<|endoftext|>"]
            .iter()
            .find_map(|token| inner.token_to_id(token));
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id: None,
            unk_id,
            chat_template: None,
        })
    }

    /// The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`): GPT-2-style
    /// byte-level BPE (`gpt2`, as SmolLM2 and LLaMA-3 use).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LlamaError> {
        let meta = |key: &str| file.metadata.get(&format!("tokenizer.ggml.{key}"));
        let id = |key: &str| meta(key).and_then(GgufValue::as_int).map(|id| id as u32);
        let model = meta("model")
            .and_then(GgufValue::as_str)
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(LlamaError::Tokenizer(format!(
                "GGUF tokenizer model {model:?}: only gpt2 (byte-level BPE) is built from GGUF; \
                 use the model's tokenizer.json"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>, LlamaError> {
            meta(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| tokenizer_error(format!("tokenizer.ggml.{key} is missing")))?
                .iter()
                .map(|value| {
                    value
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| tokenizer_error(format!("tokenizer.ggml.{key}: not text")))
                })
                .collect()
        };
        let tokens = strings("tokens")?;
        let merges = strings("merges")?
            .into_iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tokenizer_error(format!("merge {merge:?} is not a pair")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| (token.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tokenizer_error)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // Digits one by one, then GPT-2's byte-level split (llama.cpp's `smollm` and `gpt2`).
        let split_digits = meta("pre").and_then(GgufValue::as_str) == Some("smollm");
        let byte_level = ByteLevel::new(false, true, true);
        let mut pre_tokenizers = Vec::new();
        if split_digits {
            pre_tokenizers.push(PreTokenizerWrapper::Digits(Digits::new(true)));
        }
        pre_tokenizers.push(PreTokenizerWrapper::ByteLevel(byte_level));
        inner.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control tokens (type 3) are special: matched whole in text, skipped in decoding.
        if let Some(types) = meta("token_type").and_then(GgufValue::as_array) {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(kind, _)| kind.as_int() == Some(3))
                .map(|(_, token)| AddedToken::from(token.clone(), true))
                .collect();
            inner.add_special_tokens(special).map_err(tokenizer_error)?;
        }
        Ok(Self {
            inner,
            bos_id: id("bos_token_id"),
            eos_id: id("eos_token_id"),
            pad_id: id("padding_token_id"),
            unk_id: id("unknown_token_id"),
            chat_template: file
                .metadata
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
        })
    }

    /// The tokenizer of the model at `model_path`: `tokenizer.json` in a Hugging Face or Meta
    /// checkpoint folder, or the metadata of a `.gguf` file.
    pub fn for_model(model_path: &Path, config: &crate::LlamaConfig) -> Result<Self, LlamaError> {
        let json = model_path.join("tokenizer.json");
        if model_path.is_dir() && !json.is_file() && model_path.join("tokenizer.model").is_file() {
            return Err(LlamaError::Tokenizer(format!(
                "{}: SentencePiece tokenizer.model is not read; put the Hugging Face \
                 tokenizer.json of the same model beside it",
                model_path.display()
            )));
        }
        if model_path.is_dir() {
            Self::from_file(&json, config.bos_token_id, config.eos_token_id)
        } else {
            Self::from_gguf(&GgufFile::open(model_path)?)
        }
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat template)
    /// to `dir`, for transformers' `AutoTokenizer`. Returns the files written.
    pub fn save_hf(&self, dir: &Path, max_length: usize) -> Result<Vec<PathBuf>, LlamaError> {
        let mut written = Vec::new();
        let json = self.inner.to_string(false).map_err(tokenizer_error)?;
        written.push(write_file(&dir.join("tokenizer.json"), json.as_bytes())?);
        let token = |id: Option<u32>| id.and_then(|id| self.inner.id_to_token(id));
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_id),
            "unk_token": token(self.unk_id),
            "pad_token": token(Some(self.pad_id())),
            "chat_template": self.chat_template,
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": false,
        });
        let text = serde_json::to_vec_pretty(&config).expect("JSON serializes");
        written.push(write_file(&dir.join("tokenizer_config.json"), &text)?);
        Ok(written)
    }

    /// Token ids of `text`; special tokens written in it (`<|im_start|>`) are recognised. No BOS
    /// is added: chat templates and the data pipeline decide where it goes.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlamaError> {
        let encoding = self.inner.encode(text, false).map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LlamaError> {
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id to pad batches with, never EOS: padding with EOS teaches a model never to stop.
    /// The tokenizer's pad token when it differs from EOS, else its unknown token, else 0.
    pub fn pad_id(&self) -> u32 {
        [self.pad_id, self.unk_id]
            .into_iter()
            .flatten()
            .find(|&id| Some(id) != self.eos_id)
            .unwrap_or(if self.eos_id == Some(0) { 1 } else { 0 })
    }
}

/// Writes the tokenizer files of the model at `source` to `dir`: a Hugging Face or Meta
/// folder's own files are copied (none, for a folder without them); for a GGUF file they are
/// written from its metadata (see [`Tokenizer::save_hf`]). Returns the files written.
pub fn save_tokenizer_files(
    source: &Path,
    dir: &Path,
    max_length: usize,
) -> Result<Vec<PathBuf>, LlamaError> {
    if !source.is_dir() {
        return Tokenizer::from_gguf(&GgufFile::open(source)?)?.save_hf(dir, max_length);
    }
    let mut written = Vec::new();
    for name in HF_TOKENIZER_FILES {
        let file = source.join(name);
        if file.is_file() {
            let bytes = std::fs::read(&file).map_err(|err| LlamaError::io(&file, err))?;
            written.push(write_file(&dir.join(name), &bytes)?);
        }
    }
    Ok(written)
}
