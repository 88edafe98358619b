//! Handles: what C holds instead of pointers to Rust objects.
//!
//! A handle is a table slot number, the slot's generation and a type tag,
//! packed into a pointer-sized value that is never dereferenced. Freeing
//! empties the slot and bumps its generation, so a stale copy of the handle
//! (use after free, double free) no longer matches and is refused with
//! `MESHVPN_INVALID_HANDLE`; a handle of another type is refused by its
//! tag. Freed slots are reused last (FIFO), which keeps a freshly freed
//! handle from matching again until the generation counter wraps
//! (2^24 reuses of one slot on 64-bit targets, 2^12 on 32-bit ones).
//!
//! Objects live in the table as `Arc<T>`; a call clones the `Arc` and
//! releases the table lock before doing any work, so a free racing with
//! another call on the same handle only makes that call see a stopped
//! object, never freed memory.
//!
//! Every C type's `_close` and `_free` (and the lookup that starts each of
//! its functions) are the table's `close`, `free` and `lookup`: what
//! differs per type is in its [`Handled`] impl, nothing is copied.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::callback::{self, Inside};
use crate::error::{meshvpn_result, Error, Result};

#[cfg(target_pointer_width = "64")]
mod bits {
    pub(crate) const INDEX: u32 = 32;
    pub(crate) const GENERATION: u32 = 24;
}
#[cfg(target_pointer_width = "32")]
mod bits {
    pub(crate) const INDEX: u32 = 16;
    pub(crate) const GENERATION: u32 = 12;
}
const INDEX_MASK: usize = (1usize << bits::INDEX) - 1;
const GENERATION_MASK: usize = (1usize << bits::GENERATION) - 1;
const TAG_SHIFT: u32 = bits::INDEX + bits::GENERATION;

/// The type tags; distinct per C type, never 0.
pub(crate) mod tag {
    pub(crate) const ENGINE: usize = 1;
    // The userspace stack's types.
    pub(crate) const NETSTACK: usize = 2;
    pub(crate) const CONN: usize = 3;
    pub(crate) const LISTENER: usize = 4;
    pub(crate) const UDP: usize = 5;
    // The tunnel's types.
    pub(crate) const TUNNEL_AGENT: usize = 6;
    pub(crate) const TUNNEL_SERVER: usize = 7;
    pub(crate) const TUNNEL_STREAM: usize = 8;
    pub(crate) const INTERRUPTER: usize = 9;
    // The mesh's coordination.
    pub(crate) const CONTROL_SERVER: usize = 10;
    // A mesh node (control/src/join.rs).
    pub(crate) const NODE: usize = 11;
    // At most 15 types: 4 tag bits on 32-bit targets.
}

/// What a C type's handle functions do with the object behind it.
pub(crate) trait Handled {
    /// The C type, for messages (`"meshvpn_conn"`).
    const NAME: &'static str;
    /// Callbacks from inside which no function of the type may run. The
    /// log callback by default: the thread that logs may hold the very
    /// lock the call needs.
    const REFUSED_INSIDE: &'static [Inside] = &[Inside::Log];
    /// Callbacks from inside which `_free` may not run, because freeing
    /// would join the thread the callback runs on.
    const FREE_REFUSED_INSIDE: &'static [Inside] = &[Inside::Log];

    /// What `_close` and `_free` do: end what the object runs and wake
    /// every call blocked on it. Idempotent.
    fn close(&self);
}

fn refuse_inside(kinds: &[Inside], name: &str, what: &str) -> Result<()> {
    if callback::inside().is_some() {
        callback::refuse_inside(kinds, &format!("{name}{what}"))?;
    }
    Ok(())
}

impl<C, T: Handled> HandleTable<C, T> {
    /// The live object behind `handle`: how every function of the type
    /// starts.
    pub fn lookup(&self, handle: *const C) -> Result<Arc<T>> {
        refuse_inside(T::REFUSED_INSIDE, T::NAME, " functions")?;
        self.get(handle)
    }

    /// The body of every `_close`: [`Handled::close`]; the handle stays
    /// valid.
    pub fn close(&self, handle: *const C) -> Result<()> {
        self.lookup(handle)?.close();
        Ok(())
    }

    /// The body of every `_free`: NULL is a no-op; otherwise the handle
    /// and its copies die and the object is closed. Calls still running
    /// on it hold their own reference and see a closed object.
    pub fn free(&self, handle: *mut C) -> Result<()> {
        if handle.is_null() {
            return Ok(());
        }
        refuse_inside(T::FREE_REFUSED_INSIDE, T::NAME, "_free")?;
        self.remove(handle)?.close();
        Ok(())
    }
}

struct Slot<T> {
    generation: usize,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: VecDeque<usize>,
}

/// A table of live objects of one C type `C` (the opaque struct the header
/// names) backed by Rust values `T`.
pub(crate) struct HandleTable<C, T> {
    tag: usize,
    slots: Mutex<Slots<T>>,
    _c: PhantomData<fn() -> C>,
}

impl<C, T> HandleTable<C, T> {
    pub const fn new(tag: usize) -> Self {
        HandleTable {
            tag,
            slots: Mutex::new(Slots {
                slots: Vec::new(),
                free: VecDeque::new(),
            }),
            _c: PhantomData,
        }
    }

    /// Stores `value` and returns its new handle.
    pub fn insert(&self, value: Arc<T>) -> Result<*mut C> {
        let mut s = self.slots.lock();
        let index = match s.free.pop_front() {
            Some(i) => i,
            None if s.slots.len() < INDEX_MASK => {
                s.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                s.slots.len() - 1
            }
            None => return Err(Error::invalid("too many live handles")),
        };
        let slot = &mut s.slots[index];
        slot.value = Some(value);
        Ok(self.encode(index, slot.generation))
    }

    /// The object behind `handle`, if it is live.
    pub fn get(&self, handle: *const C) -> Result<Arc<T>> {
        let index = self.decode(handle)?;
        let s = self.slots.lock();
        Self::live(&s, index, handle)
            .and_then(|slot| slot.value.clone())
            .ok_or_else(|| stale(handle))
    }

    /// Takes the object out of the table; the handle and all its copies
    /// are dead from now on.
    pub fn remove(&self, handle: *const C) -> Result<Arc<T>> {
        let index = self.decode(handle)?;
        let mut s = self.slots.lock();
        let generation = Self::live(&s, index, handle)
            .filter(|slot| slot.value.is_some())
            .ok_or_else(|| stale(handle))?
            .generation;
        let slot = &mut s.slots[index];
        let value = slot.value.take().ok_or_else(|| stale(handle))?;
        slot.generation = (generation + 1) & GENERATION_MASK;
        s.free.push_back(index);
        Ok(value)
    }

    fn live(s: &Slots<T>, index: usize, handle: *const C) -> Option<&Slot<T>> {
        let generation = (handle as usize >> bits::INDEX) & GENERATION_MASK;
        s.slots
            .get(index)
            .filter(|slot| slot.generation == generation)
    }

    fn encode(&self, index: usize, generation: usize) -> *mut C {
        // Slot numbers are stored plus one so that no handle is NULL.
        let raw = (self.tag << TAG_SHIFT) | (generation << bits::INDEX) | (index + 1);
        // A handle is an integer dressed as a pointer: it carries no
        // provenance and is never dereferenced.
        std::ptr::without_provenance_mut(raw)
    }

    fn decode(&self, handle: *const C) -> Result<usize> {
        if handle.is_null() {
            return Err(Error::null("handle"));
        }
        let raw = handle as usize;
        let index = raw & INDEX_MASK;
        if raw >> TAG_SHIFT != self.tag || index == 0 {
            return Err(stale(handle));
        }
        Ok(index - 1)
    }
}

fn stale<C>(handle: *const C) -> Error {
    Error::new(
        meshvpn_result::MESHVPN_INVALID_HANDLE,
        format!("{handle:p} is not a live handle of this type (freed, stale or never issued)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Opaque;
    struct Other;

    #[test]
    fn stale_and_foreign_handles_are_refused() {
        let table: HandleTable<Opaque, u32> = HandleTable::new(1);
        let other: HandleTable<Other, u32> = HandleTable::new(2);
        let h = table.insert(Arc::new(7)).unwrap();
        assert!(!h.is_null());
        assert_eq!(*table.get(h).unwrap(), 7);
        // A handle of one type passed where another is expected.
        let e = other.get(h.cast()).unwrap_err();
        assert_eq!(e.code, meshvpn_result::MESHVPN_INVALID_HANDLE);
        assert_eq!(*table.remove(h).unwrap(), 7);
        // Use after free and double free.
        assert_eq!(
            table.get(h).unwrap_err().code,
            meshvpn_result::MESHVPN_INVALID_HANDLE
        );
        assert_eq!(
            table.remove(h).unwrap_err().code,
            meshvpn_result::MESHVPN_INVALID_HANDLE
        );
        // The slot is reused with a new generation: the old handle stays dead.
        let h2 = table.insert(Arc::new(8)).unwrap();
        assert_ne!(h, h2);
        assert_eq!(
            table.get(h).unwrap_err().code,
            meshvpn_result::MESHVPN_INVALID_HANDLE
        );
        assert_eq!(*table.get(h2).unwrap(), 8);
        // Made-up values.
        for raw in [1usize, 0xdead_beef, usize::MAX, h2 as usize + 1] {
            let fake = std::ptr::without_provenance::<Opaque>(raw);
            assert_eq!(
                table.get(fake).unwrap_err().code,
                meshvpn_result::MESHVPN_INVALID_HANDLE
            );
        }
        assert_eq!(
            table.get(std::ptr::null()).unwrap_err().code,
            meshvpn_result::MESHVPN_NULL_PARAMETER
        );
    }

    #[test]
    fn freed_slots_are_reused_last() {
        let table: HandleTable<Opaque, u32> = HandleTable::new(1);
        let a = table.insert(Arc::new(1)).unwrap();
        let b = table.insert(Arc::new(2)).unwrap();
        table.remove(a).unwrap();
        table.remove(b).unwrap();
        let c = table.insert(Arc::new(3)).unwrap();
        // `a`'s slot comes back first, with a new generation.
        assert_eq!(c as usize & INDEX_MASK, a as usize & INDEX_MASK);
        assert_ne!(c, a);
    }
}
