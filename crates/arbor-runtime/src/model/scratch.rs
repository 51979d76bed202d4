//! A layer's activation buffers, reused from layer to layer and step to step on each thread.
//! Every op of the forward pass writes the whole of its output, so a reused buffer needs no
//! zeroing; allocating and zeroing each one afresh per layer was 3% of a 64-branch SmolLM2
//! decode step (about 2 MB of memset per layer).

use std::cell::Cell;

/// Buffers larger than this in all are dropped after the pass instead of kept (a long prompt
/// chunk of a large model would otherwise pin hundreds of MB per thread).
const RETAIN_MAX_BYTES: usize = 64 << 20;

/// The forward pass's buffers, by role.
#[derive(Default)]
pub(crate) struct LayerScratch {
    pub xn: Vec<f32>,
    pub qkv: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub o: Vec<f32>,
    pub gu: Vec<f32>,
    pub act: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<LayerScratch> = Cell::new(LayerScratch::default());
}

impl LayerScratch {
    fn bytes(&self) -> usize {
        [
            &self.xn, &self.qkv, &self.q, &self.k, &self.v, &self.attn, &self.o, &self.gu,
            &self.act,
        ]
        .iter()
        .map(|b| b.capacity() * 4)
        .sum()
    }
}

/// `n` values of `buf`, grown when it is shorter; the contents are whatever an earlier pass
/// left, for a caller that overwrites them. Debug builds (the test suite) fill them with NaN,
/// so that an op that reads its output before writing all of it fails every logits test.
pub(crate) fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    let out = &mut buf[..n];
    if cfg!(debug_assertions) {
        out.fill(f32::NAN);
    }
    out
}

/// Runs `f` with this thread's buffers (taken out for the call, so a nested pass on the same
/// thread simply starts with empty ones).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut LayerScratch) -> R) -> R {
    let mut s = SCRATCH.take();
    let r = f(&mut s);
    if s.bytes() <= RETAIN_MAX_BYTES {
        SCRATCH.set(s);
    }
    r
}
