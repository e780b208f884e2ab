//! Zero-filled f32 buffers, filled on rayon's threads.
//!
//! A fresh `vec![0f32; n]` is calloc: memory reused from the heap is cleared by one memset on
//! the calling thread, while the other cores wait for the op that needs the buffer. In a
//! training step those memsets (each op's output and input gradient, several MiB apiece) were
//! the largest serial part: 40% of the host thread's own time, about 6% of the step.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Below this many values one memset costs less than handing work to the pool.
const PARALLEL_FROM: usize = 1 << 17;

/// Values zeroed per parallel task.
const CHUNK: usize = 1 << 15;

/// `vec![0f32; n]`, zeroed by the pool when it is large.
pub fn zeros(n: usize) -> Vec<f32> {
    if n < PARALLEL_FROM {
        return vec![0f32; n];
    }
    let mut v = Vec::<f32>::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the first n values were all written just above.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_zero_whatever_the_heap_held() {
        for n in [
            0,
            1,
            PARALLEL_FROM - 1,
            PARALLEL_FROM,
            PARALLEL_FROM + CHUNK + 7,
        ] {
            // Leave non-zero values in memory the allocator may hand back.
            drop(vec![f32::NAN; n]);
            let v = zeros(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.to_bits() == 0), "n = {n}");
        }
    }
}
