//! A binary trie per address family with path compression left out for
//! clarity: lookups walk at most 32 (v4) or 128 (v6) nodes, each a couple of
//! array reads. Nodes live in one arena `Vec`, freed slots are reused.
//!
//! A walk to a host route is 32 dependent reads, about a tenth of the
//! time the sending thread spends on one packet of a bulk transfer, and
//! such a transfer asks for the same address packet after packet. So the
//! IPv4 family remembers its last answer (the address and the node that
//! held the match) in one atomic word that every change to the table
//! clears; a lookup of the same address reads that word instead of walking.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::IpPrefix;

const NONE: u32 = u32::MAX;

#[derive(Clone)]
struct Node<T> {
    child: [u32; 2],
    value: Option<T>,
}

#[derive(Clone)]
struct Family<T> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    bits: u8,
    last: LastHit,
}

/// The last IPv4 lookup that matched: the address in the high half, the
/// index of the node holding the match plus one in the low half; 0 when
/// there is none. Written by lookups (which share the table), cleared by
/// every change (which has it to itself, so no lookup sees a stale word).
#[derive(Default)]
struct LastHit(AtomicU64);

impl Clone for LastHit {
    fn clone(&self) -> Self {
        // The clone's nodes are the same, so the word holds for it too.
        LastHit(AtomicU64::new(self.0.load(Relaxed)))
    }
}

impl LastHit {
    fn get(&self, key: u128) -> Option<u32> {
        let w = self.0.load(Relaxed);
        let node = w as u32;
        (node != 0 && (w >> 32) as u128 == key).then(|| node - 1)
    }

    fn set(&self, key: u128, node: u32) {
        if let (Ok(key), Some(n)) = (u32::try_from(key), node.checked_add(1)) {
            self.0.store(u64::from(key) << 32 | u64::from(n), Relaxed);
        }
    }

    fn clear(&mut self) {
        *self.0.get_mut() = 0;
    }
}

impl<T: Clone + PartialEq> Family<T> {
    fn new(bits: u8) -> Self {
        Family {
            nodes: vec![Node {
                child: [NONE; 2],
                value: None,
            }],
            free: Vec::new(),
            bits,
            last: LastHit::default(),
        }
    }

    fn bit(key: u128, bits: u8, depth: u8) -> usize {
        ((key >> (bits - 1 - depth)) & 1) as usize
    }

    fn alloc(&mut self) -> u32 {
        let node = Node {
            child: [NONE; 2],
            value: None,
        };
        if let Some(i) = self.free.pop() {
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    fn insert(&mut self, key: u128, len: u8, value: T) -> Option<T> {
        self.last.clear();
        let mut n = 0u32;
        for depth in 0..len {
            let b = Self::bit(key, self.bits, depth);
            let next = self.nodes[n as usize].child[b];
            n = if next == NONE {
                let c = self.alloc();
                self.nodes[n as usize].child[b] = c;
                c
            } else {
                next
            };
        }
        self.nodes[n as usize].value.replace(value)
    }

    fn get_exact(&self, key: u128, len: u8) -> Option<&T> {
        let mut n = 0u32;
        for depth in 0..len {
            n = self.nodes[n as usize].child[Self::bit(key, self.bits, depth)];
            if n == NONE {
                return None;
            }
        }
        self.nodes[n as usize].value.as_ref()
    }

    fn lookup(&self, key: u128) -> Option<&T> {
        let v4 = self.bits == 32;
        if v4 {
            if let Some(n) = self.last.get(key) {
                return self.nodes[n as usize].value.as_ref();
            }
        }
        let mut n = 0u32;
        let mut best = self.nodes[0].value.is_some().then_some(0);
        for depth in 0..self.bits {
            n = self.nodes[n as usize].child[Self::bit(key, self.bits, depth)];
            if n == NONE {
                break;
            }
            if self.nodes[n as usize].value.is_some() {
                best = Some(n);
            }
        }
        let best = best?;
        if v4 {
            self.last.set(key, best);
        }
        self.nodes[best as usize].value.as_ref()
    }

    /// Removes every entry for which `keep` is false, then prunes empty
    /// branches. Returns how many entries were removed.
    fn retain(&mut self, keep: &mut impl FnMut(&T) -> bool) -> usize {
        self.last.clear();
        let mut removed = 0;
        self.retain_at(0, keep, &mut removed);
        removed
    }

    /// Returns true when the subtree at `n` is now empty.
    fn retain_at(
        &mut self,
        n: u32,
        keep: &mut impl FnMut(&T) -> bool,
        removed: &mut usize,
    ) -> bool {
        // Iterative would avoid recursion depth, but depth is bounded by 128.
        for b in 0..2 {
            let c = self.nodes[n as usize].child[b];
            if c != NONE && self.retain_at(c, keep, removed) {
                self.nodes[n as usize].child[b] = NONE;
                self.free.push(c);
            }
        }
        let node = &mut self.nodes[n as usize];
        if let Some(v) = &node.value {
            if !keep(v) {
                node.value = None;
                *removed += 1;
            }
        }
        n != 0 && node.value.is_none() && node.child == [NONE; 2]
    }

    fn entries(&self, out: &mut Vec<(u128, u8, T)>) {
        let mut stack = vec![(0u32, 0u128, 0u8)];
        while let Some((n, key, depth)) = stack.pop() {
            let node = &self.nodes[n as usize];
            if let Some(v) = &node.value {
                out.push((key, depth, v.clone()));
            }
            for b in (0..2).rev() {
                let c = node.child[b];
                if c != NONE {
                    let key = key | ((b as u128) << (self.bits - 1 - depth));
                    stack.push((c, key, depth + 1));
                }
            }
        }
    }

    fn len(&self) -> usize {
        // Freed slots always hold no value, so they never count.
        self.nodes.iter().filter(|n| n.value.is_some()).count()
    }
}

/// AllowedIPs: prefixes of both families mapped to a value (a peer id).
///
/// Inserting a prefix that another value already holds moves it (the kernel's
/// rule: a prefix belongs to exactly one peer).
#[derive(Clone)]
pub struct AllowedIps<T> {
    v4: Family<T>,
    v6: Family<T>,
}

impl<T: Clone + PartialEq> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn key_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    pub fn new() -> Self {
        AllowedIps {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }

    fn family(&self, addr: IpAddr) -> &Family<T> {
        if addr.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        }
    }

    fn family_mut(&mut self, addr: IpAddr) -> &mut Family<T> {
        if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        }
    }

    /// Maps `prefix` (host bits ignored) to `value`; returns the value that
    /// held it before, if any.
    pub fn insert(&mut self, prefix: IpPrefix, value: T) -> Option<T> {
        let net = prefix.network();
        self.family_mut(net.addr())
            .insert(key_of(net.addr()), net.len(), value)
    }

    /// The value holding exactly this prefix.
    pub fn get(&self, prefix: IpPrefix) -> Option<&T> {
        let net = prefix.network();
        self.family(net.addr())
            .get_exact(key_of(net.addr()), net.len())
    }

    /// Longest-prefix match.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        self.family(addr).lookup(key_of(addr))
    }

    /// Removes every prefix held by `value`; returns how many.
    pub fn remove_value(&mut self, value: &T) -> usize {
        self.retain(|v| v != value)
    }

    /// Keeps only the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> usize {
        self.v4.retain(&mut keep) + self.v6.retain(&mut keep)
    }

    /// Every (prefix, value), v4 then v6, in address order.
    pub fn iter(&self) -> Vec<(IpPrefix, T)> {
        let mut out = Vec::new();
        let mut raw = Vec::new();
        self.v4.entries(&mut raw);
        for (k, len, v) in raw.drain(..) {
            let addr = IpAddr::V4((k as u32).into());
            out.push((
                IpPrefix::new(addr, len).expect("trie depth is a valid length"),
                v,
            ));
        }
        self.v6.entries(&mut raw);
        for (k, len, v) in raw {
            let addr = IpAddr::V6(k.into());
            out.push((
                IpPrefix::new(addr, len).expect("trie depth is a valid length"),
                v,
            ));
        }
        out
    }

    /// The prefixes held by `value`.
    pub fn prefixes_of(&self, value: &T) -> Vec<IpPrefix> {
        self.iter()
            .into_iter()
            .filter(|(_, v)| v == value)
            .map(|(p, _)| p)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive model: a list scanned for the longest containing prefix.
    fn naive(entries: &[(IpPrefix, u32)], addr: IpAddr) -> Option<u32> {
        entries
            .iter()
            .filter(|(p, _)| p.contains(addr))
            .max_by_key(|(p, _)| p.len())
            .map(|&(_, v)| v)
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        t.insert("10.1.0.0/16".parse().unwrap(), 2);
        t.insert("0.0.0.0/0".parse().unwrap(), 3);
        t.insert("fd00::/64".parse().unwrap(), 4);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("10.2.2.3".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), Some(&4));
        assert_eq!(t.lookup("fd01::1".parse().unwrap()), None);
    }

    #[test]
    fn a_prefix_moves_to_its_new_owner() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert("10.0.0.0/24".parse().unwrap(), 1), None);
        assert_eq!(t.insert("10.0.0.7/24".parse().unwrap(), 2), Some(1));
        assert_eq!(t.lookup("10.0.0.1".parse().unwrap()), Some(&2));
        assert_eq!(t.len(), 1);
        assert_eq!(t.prefixes_of(&1), vec![]);
    }

    #[test]
    fn remove_prunes_and_reuses_nodes() {
        let mut t = AllowedIps::new();
        t.insert("10.0.0.0/24".parse().unwrap(), 1);
        t.insert("10.0.1.0/24".parse().unwrap(), 2);
        t.insert("fd00::/32".parse().unwrap(), 1);
        assert_eq!(t.remove_value(&1), 2);
        assert_eq!(t.lookup("10.0.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("10.0.1.1".parse().unwrap()), Some(&2));
        assert_eq!(t.iter(), vec![("10.0.1.0/24".parse().unwrap(), 2)]);
        let before = t.v4.nodes.len();
        t.insert("10.0.0.0/24".parse().unwrap(), 3);
        assert_eq!(t.v4.nodes.len(), before, "freed nodes are reused");
    }

    #[test]
    fn a_change_is_seen_by_the_next_lookup_of_the_same_address() {
        let host: IpAddr = "10.1.2.3".parse().unwrap();
        let mut t = AllowedIps::new();
        assert_eq!(t.lookup(host), None);
        t.insert("10.0.0.0/8".parse().unwrap(), 1);
        assert_eq!(t.lookup(host), Some(&1));
        assert_eq!(t.lookup(host), Some(&1), "answered from the last hit");
        t.insert("10.1.2.3/32".parse().unwrap(), 2);
        assert_eq!(t.lookup(host), Some(&2), "a longer prefix added");
        t.insert("10.1.2.3/32".parse().unwrap(), 3);
        assert_eq!(t.lookup(host), Some(&3), "the prefix moved");
        t.remove_value(&3);
        assert_eq!(t.lookup(host), Some(&1), "the longer prefix removed");
        let copy = t.clone();
        t.remove_value(&1);
        assert_eq!(t.lookup(host), None, "no prefix left");
        assert_eq!(copy.lookup(host), Some(&1), "a clone keeps its own");
        // Freed nodes are reused by other prefixes: the word must not
        // point into them.
        t.insert("10.1.0.0/16".parse().unwrap(), 4);
        assert_eq!(t.lookup(host), Some(&4));
        t.remove_value(&4);
        t.insert("10.1.2.0/24".parse().unwrap(), 5);
        t.insert("192.168.0.0/16".parse().unwrap(), 6);
        assert_eq!(t.lookup(host), Some(&5));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), Some(&6));
        assert_eq!(t.lookup(host), Some(&5));
    }

    #[test]
    fn matches_naive_model_when_lookups_and_changes_interleave() {
        let mut rng = Lcg(11);
        let mut t = AllowedIps::new();
        let mut model: Vec<(IpPrefix, u32)> = Vec::new();
        // A small space, so the same addresses come back between changes.
        let addr = |rng: &mut Lcg| -> IpAddr {
            IpAddr::V4(((10u32 << 24) | (rng.next() as u32 & 0x0303)).into())
        };
        for step in 0..4000 {
            match rng.next() % 4 {
                0 => {
                    let len = 22 + (rng.next() % 11) as u8;
                    let p = IpPrefix::new(addr(&mut rng), len).unwrap().network();
                    let val = (rng.next() % 6) as u32;
                    t.insert(p, val);
                    model.retain(|(q, _)| *q != p);
                    model.push((p, val));
                }
                1 => {
                    let victim = (rng.next() % 6) as u32;
                    t.remove_value(&victim);
                    model.retain(|&(_, v)| v != victim);
                }
                _ => {
                    let a = addr(&mut rng);
                    for _ in 0..2 {
                        assert_eq!(t.lookup(a).copied(), naive(&model, a), "step {step} {a}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_naive_model_on_random_tables() {
        let mut rng = Lcg(7);
        for round in 0..40 {
            let mut t = AllowedIps::new();
            let mut model: Vec<(IpPrefix, u32)> = Vec::new();
            for i in 0..200 {
                let v6 = rng.next() % 3 == 0;
                let addr: IpAddr = if v6 {
                    let hi = 0xfd00u128 << 112 | ((rng.next() as u128 & 0xff) << 104);
                    IpAddr::V6((hi | rng.next() as u128).into())
                } else {
                    IpAddr::V4(((10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff)).into())
                };
                let max = if v6 { 128 } else { 32 };
                let len = (rng.next() % (max as u64 + 1)) as u8;
                let p = IpPrefix::new(addr, len).unwrap().network();
                let val = (rng.next() % 16) as u32;
                t.insert(p, val);
                model.retain(|(q, _)| *q != p);
                model.push((p, val));
                if i % 50 == 49 {
                    let victim = (rng.next() % 16) as u32;
                    t.remove_value(&victim);
                    model.retain(|&(_, v)| v != victim);
                }
            }
            for _ in 0..500 {
                let addr: IpAddr = if rng.next() % 3 == 0 {
                    let hi = 0xfd00u128 << 112 | ((rng.next() as u128 & 0xff) << 104);
                    IpAddr::V6((hi | rng.next() as u128).into())
                } else {
                    IpAddr::V4(((10u32 << 24) | (rng.next() as u32 & 0x00ff_ffff)).into())
                };
                assert_eq!(
                    t.lookup(addr).copied(),
                    naive(&model, addr),
                    "round {round} {addr}"
                );
            }
            let mut got = t.iter();
            got.sort();
            model.sort();
            assert_eq!(got, model);
        }
    }
}
