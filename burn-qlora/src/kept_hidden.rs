//! The adapter's hidden `x·A` and its cast to the compute dtype carried from a layer's forward
//! without a graph to its recomputation over the same input, activation checkpointing's: the
//! recomputation then skips the hidden's kernel (a pass over the input, as long as a plain read
//! of it) and the cast, 14 launches a LLaMA layer. The two forwards see the same input bit for
//! bit (the recomputation repeats the same kernels on the same layer input) and the same
//! adapter (the optimizer steps after the backward), so what is kept is what it would compute.

use std::sync::{Arc, Mutex};

use kernels_cubecl::KeptAdapter;

/// What a projection does with the adapter's hidden, in one of the two copies of a layer that
/// [`KeptHidden::pair`] makes; the copies share the slot.
#[derive(Clone, Debug)]
pub enum KeptHidden {
    /// The forward without a graph: computes the layer and puts the hidden in the slot.
    Keep(HiddenSlot),
    /// The recomputation: takes the hidden out of the slot (once) instead of computing it, and
    /// computes it where the slot is empty.
    Take(HiddenSlot),
}

impl KeptHidden {
    /// The keeping and the taking side of one new, empty slot.
    pub fn pair() -> (Self, Self) {
        let slot = HiddenSlot::default();
        (Self::Keep(slot.clone()), Self::Take(slot))
    }
}

/// One projection's hidden between the two forwards, shared by the layer's copies.
#[derive(Clone, Debug, Default)]
pub struct HiddenSlot(Arc<Mutex<Option<KeptAdapter>>>);

impl HiddenSlot {
    pub fn put(&self, kept: KeptAdapter) {
        *self.lock() = Some(kept);
    }

    /// What was kept, leaving the slot empty.
    pub fn take(&self) -> Option<KeptAdapter> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<KeptAdapter>> {
        // A panic while holding the lock cannot leave the slot half-written: take the value.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
