// meshvpn patch (see engine/vendor/README.md): the sender's record of the
// SACK blocks (RFC 2018) the remote reported, so loss recovery retransmits
// the holes between them instead of waiting for a retransmission timeout.

use crate::wire::TcpSeqNumber;

/// Blocks remembered at most; when full, the highest one is forgotten (it
/// only delays a retransmission decision, never breaks correctness).
const MAX_BLOCKS: usize = 16;

/// Sorted, disjoint, non-adjacent `[left, right)` ranges of sequence space
/// above SND.UNA that the remote holds.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) struct Scoreboard {
    blocks: [(TcpSeqNumber, TcpSeqNumber); MAX_BLOCKS],
    len: usize,
}

impl Default for Scoreboard {
    fn default() -> Self {
        Scoreboard {
            blocks: [(TcpSeqNumber(0), TcpSeqNumber(0)); MAX_BLOCKS],
            len: 0,
        }
    }
}

impl Scoreboard {
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn blocks(&self) -> &[(TcpSeqNumber, TcpSeqNumber)] {
        &self.blocks[..self.len]
    }

    /// Drops what `una` acknowledged cumulatively, then adds the blocks of
    /// one ACK. Blocks outside `(una, snd_max]` (stale or forged) are
    /// ignored. Returns whether the remote reported bytes not known before.
    pub fn update(
        &mut self,
        una: TcpSeqNumber,
        snd_max: TcpSeqNumber,
        ranges: &[Option<(u32, u32)>],
    ) -> bool {
        self.forget_below(una);
        let mut grew = false;
        for &(left, right) in ranges.iter().flatten() {
            let (left, right) = (TcpSeqNumber(left as i32), TcpSeqNumber(right as i32));
            if left <= una || right <= left || right > snd_max {
                continue;
            }
            grew |= self.insert(left, right);
        }
        grew
    }

    fn forget_below(&mut self, una: TcpSeqNumber) {
        let mut kept = 0;
        for i in 0..self.len {
            let (left, right) = self.blocks[i];
            if right <= una {
                continue;
            }
            self.blocks[kept] = (left.max(una), right);
            kept += 1;
        }
        self.len = kept;
    }

    fn insert(&mut self, mut left: TcpSeqNumber, mut right: TcpSeqNumber) -> bool {
        // Merge every block that overlaps or touches [left, right).
        let mut grew = true;
        let mut kept = 0;
        let mut at = None;
        for i in 0..self.len {
            let (l, r) = self.blocks[i];
            if r < left || l > right {
                if at.is_none() && l > right {
                    at = Some(kept);
                }
                self.blocks[kept] = (l, r);
                kept += 1;
            } else {
                if l <= left && r >= right {
                    grew = false;
                }
                left = left.min(l);
                right = right.max(r);
            }
        }
        self.len = kept;
        let at = at.unwrap_or(kept);
        if self.len == MAX_BLOCKS {
            if at == MAX_BLOCKS {
                return false;
            }
            self.len -= 1;
        }
        self.blocks.copy_within(at..self.len, at + 1);
        self.blocks[at] = (left, right);
        self.len += 1;
        grew
    }

    /// Bytes the remote reported holding above SND.UNA.
    pub fn sacked_bytes(&self) -> usize {
        self.blocks().iter().map(|&(l, r)| r - l).sum()
    }

    /// The highest sequence number the remote reported holding.
    pub fn highest(&self) -> Option<TcpSeqNumber> {
        self.blocks().last().map(|&(_, r)| r)
    }

    /// RFC 6675's IsLost: every unSACKed byte below the returned sequence
    /// number has at least `threshold` SACKed bytes above it.
    pub fn lost_edge(&self, threshold: usize) -> Option<TcpSeqNumber> {
        let mut above = 0;
        for &(l, r) in self.blocks().iter().rev() {
            let len = r - l;
            if above + len >= threshold {
                return Some(r - (threshold - above));
            }
            above += len;
        }
        None
    }

    /// UnSACKed bytes in `[from, end)`.
    pub fn hole_bytes(&self, from: TcpSeqNumber, end: TcpSeqNumber) -> usize {
        if from >= end {
            return 0;
        }
        let sacked: usize = self
            .blocks()
            .iter()
            .map(|&(l, r)| {
                let (l, r) = (l.max(from), r.min(end));
                if r > l { r - l } else { 0 }
            })
            .sum();
        (end - from) - sacked
    }

    /// The first hole at or above `from` and below `end`: its start and its
    /// length (up to the next block, or `end`).
    pub fn hole_from(
        &self,
        mut from: TcpSeqNumber,
        end: TcpSeqNumber,
    ) -> Option<(TcpSeqNumber, usize)> {
        for &(l, r) in self.blocks() {
            if from >= end {
                return None;
            }
            if from < l {
                return Some((from, l.min(end) - from));
            }
            from = from.max(r);
        }
        (from < end).then(|| (from, end - from))
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn s(n: i32) -> TcpSeqNumber {
        TcpSeqNumber(n)
    }

    #[test]
    fn merges_and_finds_holes() {
        let mut b = Scoreboard::default();
        assert!(b.update(s(100), s(1000), &[Some((300, 400)), Some((500, 600)), None]));
        assert!(!b.update(s(100), s(1000), &[Some((300, 400)), None, None]));
        assert!(b.update(s(100), s(1000), &[Some((400, 500)), None, None]));
        assert_eq!(b.blocks(), &[(s(300), s(600))]);
        assert_eq!(b.sacked_bytes(), 300);
        assert_eq!(b.highest(), Some(s(600)));
        assert_eq!(b.hole_from(s(100), s(1000)), Some((s(100), 200)));
        assert_eq!(b.hole_from(s(300), s(1000)), Some((s(600), 400)));
        assert_eq!(b.hole_from(s(300), s(600)), None);
        // Cumulative ACK inside the block trims it.
        b.update(s(350), s(1000), &[]);
        assert_eq!(b.blocks(), &[(s(350), s(600))]);
        b.update(s(700), s(1000), &[]);
        assert!(b.is_empty());
    }

    #[test]
    fn lost_edge_and_hole_bytes() {
        let mut b = Scoreboard::default();
        b.update(s(100), s(1000), &[Some((300, 400)), Some((500, 550)), None]);
        // 50 bytes SACKed above 500, 150 above 350.
        assert_eq!(b.lost_edge(50), Some(s(500)));
        assert_eq!(b.lost_edge(100), Some(s(350)));
        assert_eq!(b.lost_edge(151), None);
        assert_eq!(b.hole_bytes(s(100), s(1000)), 900 - 150);
        assert_eq!(b.hole_bytes(s(350), s(520)), 170 - 50 - 20);
        assert_eq!(b.hole_bytes(s(520), s(500)), 0);
    }

    #[test]
    fn ignores_blocks_outside_the_window() {
        let mut b = Scoreboard::default();
        // Below SND.UNA, above SND.MAX, inverted, empty.
        let bad = [Some((50, 150)), Some((900, 1100)), Some((400, 300))];
        assert!(!b.update(s(100), s(1000), &bad));
        assert!(!b.update(s(100), s(1000), &[Some((200, 200)), None, None]));
        assert!(b.is_empty());
    }

    #[test]
    fn sequence_wrap() {
        let mut b = Scoreboard::default();
        let una = s(i32::MAX - 100);
        let hi = una + 1000;
        assert!(b.update(
            una,
            hi,
            &[Some(((una + 200).0 as u32, (una + 300).0 as u32))]
        ));
        assert_eq!(b.hole_from(una, hi), Some((una, 200)));
        assert_eq!(b.hole_from(una + 200, hi), Some((una + 300, 700)));
    }

    #[test]
    fn full_board_keeps_the_lowest_blocks() {
        let mut b = Scoreboard::default();
        for i in 0..(MAX_BLOCKS as u32 + 4) {
            let l = 1000 + i * 100;
            b.update(s(0), s(100_000), &[Some((l, l + 10))]);
        }
        assert_eq!(b.len, MAX_BLOCKS);
        assert_eq!(b.blocks()[0], (s(1000), s(1010)));
        // A lower block still gets in, pushing out the highest.
        b.update(s(0), s(100_000), &[Some((10, 20))]);
        assert_eq!(b.blocks()[0], (s(10), s(20)));
        assert_eq!(b.len, MAX_BLOCKS);
    }
}
