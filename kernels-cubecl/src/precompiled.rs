//! The CUDA kernels written by hand (`wgmma.cu`, `flash_attention.cu`, `thin_product.cu`) enter
//! CubeCL as precompiled sources: NVRTC compiles their text as it does a generated kernel's, and
//! they launch on the same stream and allocator. What they share: no IR, a block size, an entry
//! point and a text per compilation.

use std::fmt::Debug;
use std::hash::Hash;

use cubecl::ir::metadata::Info;
use cubecl::ir::{AddressType, ElemType, UIntKind};
use cubecl::prelude::*;
use cubecl::{CubeKernel, PrecompiledSource};

/// A hand-written CUDA kernel; a value (its sizes, layout, entry point) is one compilation.
pub(crate) trait CudaKernel: Clone + Eq + Hash + Debug + Send + Sync + 'static {
    /// Threads a block.
    const THREADS: u32;

    /// The `extern "C"` function the launch calls.
    fn entry_point(&self) -> &'static str;

    /// The CUDA text: the kernel's file behind this compilation's defines.
    fn text(&self) -> String;
}

/// A [`CudaKernel`] as CubeCL launches it.
pub(crate) struct Precompiled<K>(pub K);

impl<K: CudaKernel> KernelMetadata for Precompiled<K> {
    fn id(&self) -> KernelId {
        KernelId::new::<K>().info(self.0.clone())
    }

    fn address_type(&self) -> ElemType {
        UIntKind::U32.into()
    }
}

impl<K: CudaKernel> CubeKernel for Precompiled<K> {
    /// No IR: the definition carries the block size the launch uses.
    fn define(&self) -> KernelDefinition {
        let settings = KernelSettings::new(
            CubeDim::new_1d(K::THREADS).0,
            ExecutionMode::Unchecked,
            AddressType::U32,
        );
        KernelDefinition {
            body: Scope::root(settings.clone()),
            settings,
            info: Info::default(),
        }
    }

    fn source(&self) -> Option<PrecompiledSource> {
        Some(PrecompiledSource {
            source: self.0.text(),
            entrypoint_name: self.0.entry_point().to_string(),
            lang: "cuda",
        })
    }
}

/// The kernels' texts compiled here, without a GPU: NVRTC (loaded at run time, as CubeCL loads
/// it) builds each for `sm_90a`, through ptxas, so a syntax error, a bad inline `asm` or an
/// operand list that does not match its instruction fails a test on any machine with the
/// library (CI installs it from the `nvidia-cuda-nvrtc` wheel), not first on the GPU.
#[cfg(test)]
pub(crate) mod nvrtc_check {
    use std::ffi::CString;

    use cudarc::nvrtc::result;

    use super::CudaKernel;

    /// Compiles `kernel`'s text for `sm_90a` and returns ptxas' report (registers, spills), or
    /// `None`, with the reason printed, where NVRTC cannot be loaded (a failure instead where
    /// `KERNELS_REQUIRE_NVRTC` is set, as in CI). Panics with NVRTC's log where the text does
    /// not compile.
    pub(crate) fn compile_for_hopper(kernel: &impl CudaKernel) -> Option<String> {
        // SAFETY: only tries to open the library by its names.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("KERNELS_REQUIRE_NVRTC").is_none(),
                "KERNELS_REQUIRE_NVRTC is set but libnvrtc is not on the library path"
            );
            println!("skipped: libnvrtc is not on the library path");
            return None;
        }
        let source = CString::new(kernel.text()).expect("the text has no NUL byte");
        let program = result::create_program(&source, None).expect("NVRTC takes the program");
        let options = [
            "--gpu-architecture=sm_90a",
            "--ptxas-options=-v",
            "--std=c++17",
        ];
        // SAFETY: the program was just created and is destroyed once, below.
        let compiled = unsafe { result::compile_program(program, &options) };
        // SAFETY: as above; the log exists once compilation ran.
        let log = unsafe { result::get_program_log(program) }.expect("NVRTC has a log");
        // SAFETY: as above.
        unsafe { result::destroy_program(program) }.expect("the program is destroyed once");
        let log: Vec<u8> = log
            .iter()
            .map(|&c| c as u8)
            .take_while(|&c| c != 0)
            .collect();
        let log = String::from_utf8_lossy(&log).into_owned();
        assert!(
            compiled.is_ok(),
            "{} does not compile: {log}",
            kernel.entry_point()
        );
        Some(log)
    }

    /// [`compile_for_hopper`], also failing where ptxas spilled registers or serialized the
    /// `wgmma` instructions: the configurations the 7B shapes run, whose speed depends on both.
    pub(crate) fn compiles_without_spills(kernel: &impl CudaKernel) {
        let Some(log) = compile_for_hopper(kernel) else {
            return;
        };
        assert!(
            log.contains(" 0 bytes spill stores") && !log.contains("serialized"),
            "{:?}: {log}",
            kernel
        );
    }
}
