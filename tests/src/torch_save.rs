//! Writes a state dict of f32 tensors the way `torch.save` does (PyTorch ≥ 1.6 ZIP container,
//! pickle protocol 2, one stored entry per storage), so checkpoint readers can be tested without
//! PyTorch.

use std::io::Write;
use std::path::Path;

use zip::ZipWriter;
use zip::write::SimpleFileOptions;

/// One tensor of a state dict: name, shape and row-major values.
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Saves `tensors` as an `OrderedDict` state dict at `path`.
pub fn save_state_dict(path: &Path, tensors: &[StateTensor]) -> std::io::Result<()> {
    let mut zip = ZipWriter::new(std::fs::File::create(path)?);
    // torch.save stores entries uncompressed and aligned so storages can be memory-mapped.
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", options)?;
    zip.write_all(&pickle(tensors))?;
    for (key, tensor) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), options)?;
        for value in &tensor.values {
            zip.write_all(&value.to_le_bytes())?;
        }
    }
    zip.start_file("archive/byteorder", options)?;
    zip.write_all(b"little")?;
    zip.start_file("archive/version", options)?;
    zip.write_all(b"3\n")?;
    zip.finish()?;
    Ok(())
}

/// The `data.pkl` of a state dict: each value is
/// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` with the
/// storage a persistent id `('storage', torch.FloatStorage, key, 'cpu', numel)`.
fn pickle(tensors: &[StateTensor]) -> Vec<u8> {
    let mut out = vec![0x80, 2]; // PROTO 2
    let ordered_dict = |out: &mut Vec<u8>| {
        global(out, "collections", "OrderedDict");
        out.extend([b')', b'R']); // EMPTY_TUPLE, REDUCE
    };
    ordered_dict(&mut out);
    out.push(b'('); // MARK
    for (key, tensor) in tensors.iter().enumerate() {
        unicode(&mut out, &tensor.name);
        global(&mut out, "torch._utils", "_rebuild_tensor_v2");
        out.push(b'(');
        out.push(b'(');
        unicode(&mut out, "storage");
        global(&mut out, "torch", "FloatStorage");
        unicode(&mut out, &key.to_string());
        unicode(&mut out, "cpu");
        int(&mut out, tensor.values.len());
        out.extend([b't', b'Q']); // TUPLE, BINPERSID
        int(&mut out, 0);
        let mut strides = vec![1; tensor.shape.len()];
        for axis in (0..tensor.shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1] * tensor.shape[axis + 1];
        }
        for dims in [&tensor.shape, &strides] {
            out.push(b'(');
            for &dim in dims {
                int(&mut out, dim);
            }
            out.push(b't');
        }
        out.push(0x89); // NEWFALSE: requires_grad
        ordered_dict(&mut out); // backward hooks
        out.extend([b't', b'R']);
    }
    out.extend([b'u', b'.']); // SETITEMS, STOP
    out
}

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend(format!("{module}\n{name}\n").bytes());
}

fn unicode(out: &mut Vec<u8>, text: &str) {
    out.push(b'X');
    out.extend((text.len() as u32).to_le_bytes());
    out.extend(text.bytes());
}

fn int(out: &mut Vec<u8>, value: usize) {
    out.push(b'J');
    out.extend(i32::try_from(value).expect("fits BININT").to_le_bytes());
}
