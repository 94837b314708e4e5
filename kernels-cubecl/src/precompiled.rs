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
