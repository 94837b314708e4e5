//! bitsandbytes' safetensors layout: every golden state survives save and load unchanged, the
//! JSON carries what transformers writes, and a broken file is refused naming the tensor.

mod common;

use common::golden_cases;
use kernels_cubecl::bnb_format::{from_tensors, load, serialize, to_tensors};
use safetensors::SafeTensors;

#[test]
fn golden_states_round_trip_through_safetensors() {
    let dir = std::env::temp_dir().join(format!("bnb-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in golden_cases() {
        let state = case.state();
        let path = dir.join("weight.safetensors");
        std::fs::write(
            &path,
            serialize(&[("model.layers.0.mlp.up_proj.weight", &state)]).unwrap(),
        )
        .unwrap();
        let loaded = load(&path, &["model.layers.0.mlp.up_proj.weight"]).unwrap();
        assert_eq!(loaded, vec![state.clone()], "{}", case.name);

        let tensors = to_tensors("w", &state).unwrap();
        let json = tensors
            .iter()
            .find(|t| t.name.starts_with("w.quant_state.bitsandbytes__"))
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json.bytes).unwrap();
        assert_eq!(json["blocksize"], 64, "{}", case.name);
        assert_eq!(
            json["shape"],
            serde_json::json!(case.shape),
            "{}",
            case.name
        );
        assert_eq!(
            json.get("nested_offset").is_some(),
            case.double_quant,
            "{}",
            case.name
        );
        let packed = tensors.iter().find(|t| t.name == "w").unwrap();
        assert_eq!(packed.shape, vec![case.packed.len(), 1], "{}", case.name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_broken_file_names_the_tensor() {
    let Some(case) = golden_cases().into_iter().find(|c| c.double_quant) else {
        return;
    };
    let mut tensors = to_tensors("w", &case.state()).unwrap();
    tensors.retain(|t| t.name != "w.nested_absmax");
    let views: Vec<_> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let err = from_tensors(&SafeTensors::deserialize(&bytes).unwrap(), "w").unwrap_err();
    assert!(err.to_string().contains("w.nested_absmax"), "{err}");

    let missing = load(
        std::path::Path::new("/nonexistent/weights.safetensors"),
        &["w"],
    )
    .unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/weights.safetensors"),
        "{missing}"
    );
}
