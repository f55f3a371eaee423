//! Backend choice for a new flow.

/// Maps a uniformly random 32-bit value onto `0..count` without division
/// (Lemire's multiply-shift), so every slot is equally likely up to 1/2^32.
#[inline(always)]
pub fn slot(random: u32, count: u32) -> u32 {
    ((random as u64 * count as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_range() {
        for count in 1..50u32 {
            for r in [0, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                assert!(slot(r, count) < count);
            }
        }
    }

    #[test]
    fn spreads_evenly() {
        // Equal-width strides of the random space land evenly on the slots.
        let count = 3;
        let mut hits = [0u32; 3];
        let n = 30_000u32;
        for i in 0..n {
            hits[slot(i.wrapping_mul(u32::MAX / n), count) as usize] += 1;
        }
        for h in hits {
            assert!((9_900..=10_100).contains(&h), "{hits:?}");
        }
    }
}
