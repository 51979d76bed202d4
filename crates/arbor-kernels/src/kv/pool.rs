//! Storage of the KV pages.

use super::{KeySummaries, PageId};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::borrow::Cow;

/// How a host pool stores K and V: f32 (the reference, and the library default) or f16 (half
/// the bytes per token, rounded to 11 significant bits; the CLI's default). Attention widens
/// f16 exactly, in registers or a page at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Part of a page's K or V of one head, as stored: see [`KvRun::to_f32`].
#[derive(Clone, Copy, Debug)]
pub enum KvRun<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> KvRun<'a> {
    /// Elements `r` of the run.
    pub fn range(self, r: std::ops::Range<usize>) -> Self {
        match self {
            KvRun::F32(s) => KvRun::F32(&s[r]),
            KvRun::F16(s) => KvRun::F16(&s[r]),
        }
    }

    /// Rows `r` of the run, taken as rows of `width` elements (positions of a page).
    pub fn rows(self, r: std::ops::Range<usize>, width: usize) -> Self {
        self.range(r.start * width..r.end * width)
    }

    /// Elements in the run.
    pub fn len(&self) -> usize {
        match self {
            KvRun::F32(s) => s.len(),
            KvRun::F16(s) => s.len(),
        }
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The run as f32: itself, or converted into the front of `scratch` (at least as long).
    #[inline]
    pub fn to_f32<'s>(self, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            KvRun::F32(s) => s,
            KvRun::F16(h) => {
                let out = &mut scratch[..h.len()];
                f16_to_f32(h, out);
                out
            }
        }
    }
}

/// `out[i] = h[i]` as f32 (exact), eight at a time with F16C where the CPU has it.
#[inline]
fn f16_to_f32(h: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU supports AVX and F16C; `h` and `out` have the same length.
        #[target_feature(enable = "avx,f16c")]
        unsafe fn wide(h: &[f16], out: &mut [f32]) {
            use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
            let n8 = h.len() / 8 * 8;
            for i in (0..n8).step_by(8) {
                let v = _mm_loadu_si128(h.as_ptr().add(i) as *const _);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
            }
            for i in n8..h.len() {
                out[i] = h[i].to_f32();
            }
        }
        if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
            // SAFETY: both features were just detected; the lengths match (the caller's
            // slices are cut to one length).
            unsafe { wide(h, &mut out[..h.len()]) };
            return;
        }
    }
    h.convert_to_f32_slice(out);
}

/// The stored elements.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// Shape of a model's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Token positions per page (8, 16 or 32).
    pub page_size: usize,
}

impl KvLayout {
    /// f32 elements of one page in one layer (K and V).
    pub fn page_elems_per_layer(&self) -> usize {
        2 * self.num_kv_heads * self.page_size * self.head_dim
    }
    /// Bytes of K and V for one token across all layers, at `elem_bytes` per element.
    pub fn bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }
    /// Bytes of one page across all layers.
    pub fn bytes_per_page(&self, elem_bytes: usize) -> usize {
        self.bytes_per_token(elem_bytes) * self.page_size
    }
}

/// Host memory for `num_pages` pages of every layer, f32 or f16 ([`KvDtype`]).
#[derive(Debug)]
pub struct KvPool {
    pub layout: KvLayout,
    pub num_pages: usize,
    data: Store,
    /// Per-page key min/max for sparse attention, kept in step with `data`.
    summaries: KeySummaries,
    /// The pages live on a device (see [`KvPool::detached`]): `data` is empty.
    detached: bool,
    /// Copy-on-write copies `(src, dst, slots)` a detached pool's device must still make.
    copies: Vec<(PageId, PageId, usize)>,
}

impl KvPool {
    /// An f32 pool.
    pub fn new(layout: KvLayout, num_pages: usize) -> Self {
        Self::with_dtype(layout, num_pages, KvDtype::F32)
    }

    /// A pool storing `dtype`.
    pub fn with_dtype(layout: KvLayout, num_pages: usize, dtype: KvDtype) -> Self {
        let n = layout.num_layers * num_pages * layout.page_elems_per_layer();
        KvPool {
            layout,
            num_pages,
            data: match dtype {
                KvDtype::F32 => Store::F32(vec![0.0; n]),
                KvDtype::F16 => Store::F16(vec![f16::ZERO; n]),
            },
            summaries: KeySummaries::new(&layout, num_pages),
            detached: false,
            copies: Vec::new(),
        }
    }

    /// A pool whose pages live in device memory: it holds no K/V on the host; writes are
    /// the device's business, and page copies are recorded for [`KvPool::take_copies`].
    pub fn detached(layout: KvLayout, num_pages: usize) -> Self {
        KvPool {
            layout,
            num_pages,
            data: Store::F32(Vec::new()),
            summaries: KeySummaries::new(&layout, 0),
            detached: true,
            copies: Vec::new(),
        }
    }

    /// Scratch for [`KvRun::to_f32`] of one page's K or V: empty for an f32 pool, whose runs
    /// need none.
    pub fn page_scratch(&self) -> Vec<f32> {
        match self.data {
            Store::F32(_) => Vec::new(),
            Store::F16(_) => vec![0.0; self.layout.page_size * self.layout.head_dim],
        }
    }

    /// How K and V are stored.
    pub fn dtype(&self) -> KvDtype {
        match self.data {
            Store::F32(_) => KvDtype::F32,
            Store::F16(_) => KvDtype::F16,
        }
    }

    /// Whether the pages live on a device.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// The page copies recorded since the last call (detached pools only), in order.
    pub fn take_copies(&mut self) -> Vec<(PageId, PageId, usize)> {
        std::mem::take(&mut self.copies)
    }

    /// Element offset of (layer, page, k|v, head, slot) in the host layout
    /// `[layer][kv_head][page][k|v][slot][head_dim]`: one head's pages lie side by side, so a
    /// kernel walking a sequence's pages head by head streams memory instead of striding over
    /// the other heads (on a 2-core EPYC, 4 KiB runs 24 KiB apart read at 9 GB/s on one
    /// thread, contiguous memory at 23).
    fn offset(&self, layer: usize, page: PageId, kv: usize, head: usize, slot: usize) -> usize {
        let l = &self.layout;
        ((((layer * l.num_kv_heads + head) * self.num_pages + page as usize) * 2 + kv)
            * l.page_size
            + slot)
            * l.head_dim
    }

    /// Elements from one KV head's data to the next head's (same layer, page, slot): all of
    /// a head's pages.
    fn head_stride(&self) -> usize {
        self.num_pages * 2 * self.layout.page_size * self.layout.head_dim
    }

    /// Stores one token's K and V (`num_kv_heads × head_dim` each) at `slot` of `page`.
    pub fn write(&mut self, layer: usize, page: PageId, slot: usize, k: &[f32], v: &[f32]) {
        if self.detached {
            return;
        }
        let hd = self.layout.head_dim;
        let n = self.layout.num_kv_heads * hd;
        let (k, v) = (&k[..n], &v[..n]);
        let (ko, vo) = (
            self.offset(layer, page, 0, 0, slot),
            self.offset(layer, page, 1, 0, slot),
        );
        let head_stride = self.head_stride();
        let at = |o: usize, h: usize| o + h * head_stride..o + h * head_stride + hd;
        // The summaries describe the stored keys: an f16 pool's, rounded.
        let stored_k: Cow<[f32]> = match &mut self.data {
            Store::F32(d) => {
                for (h, (kh, vh)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
                    d[at(ko, h)].copy_from_slice(kh);
                    d[at(vo, h)].copy_from_slice(vh);
                }
                Cow::Borrowed(k)
            }
            Store::F16(d) => {
                let mut rounded = vec![0.0f32; n];
                for (h, (kh, vh)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
                    d[at(ko, h)].convert_from_f32_slice(kh);
                    d[at(vo, h)].convert_from_f32_slice(vh);
                    f16_to_f32(&d[at(ko, h)], &mut rounded[h * hd..(h + 1) * hd]);
                }
                Cow::Owned(rounded)
            }
        };
        let len = self.layout.page_size * hd;
        let k0 = self.offset(layer, page, 0, 0, 0);
        let data = &self.data;
        self.summaries.record(layer, page, slot, &stored_k, |h| {
            page_keys(data, k0 + h * head_stride, len)
        });
    }

    /// Per-page key summaries (min/max per channel) for sparse attention.
    pub fn summaries(&self) -> &KeySummaries {
        &self.summaries
    }

    /// K vectors of `head` for every slot of `page` (`page_size × head_dim`), as stored.
    pub fn key_run(&self, layer: usize, page: PageId, head: usize) -> KvRun<'_> {
        self.run(self.offset(layer, page, 0, head, 0))
    }

    /// V vectors of `head` for every slot of `page` (`page_size × head_dim`), as stored.
    pub fn value_run(&self, layer: usize, page: PageId, head: usize) -> KvRun<'_> {
        self.run(self.offset(layer, page, 1, head, 0))
    }

    fn run(&self, o: usize) -> KvRun<'_> {
        let n = self.layout.page_size * self.layout.head_dim;
        match &self.data {
            Store::F32(d) => KvRun::F32(&d[o..o + n]),
            Store::F16(d) => KvRun::F16(&d[o..o + n]),
        }
    }

    /// K vectors of `head` for every slot of `page`: `page_size × head_dim`. An f32 pool's
    /// (tests and tools; attention reads [`KvPool::key_run`]).
    ///
    /// # Panics
    /// On an f16 pool.
    pub fn keys(&self, layer: usize, page: PageId, head: usize) -> &[f32] {
        match self.key_run(layer, page, head) {
            KvRun::F32(s) => s,
            KvRun::F16(_) => panic!("KvPool::keys on an f16 pool: use key_run"),
        }
    }

    /// V vectors of `head` for every slot of `page`, as [`KvPool::keys`].
    ///
    /// # Panics
    /// On an f16 pool.
    pub fn values(&self, layer: usize, page: PageId, head: usize) -> &[f32] {
        match self.value_run(layer, page, head) {
            KvRun::F32(s) => s,
            KvRun::F16(_) => panic!("KvPool::values on an f16 pool: use value_run"),
        }
    }

    /// Copies the first `slots` positions of page `src` into page `dst` in every layer
    /// (copy-on-write of a shared partial page).
    pub fn copy_page(&mut self, src: PageId, dst: PageId, slots: usize) {
        if self.detached {
            self.copies.push((src, dst, slots));
            return;
        }
        let l = self.layout;
        for layer in 0..l.num_layers {
            for kv in 0..2 {
                for h in 0..l.num_kv_heads {
                    let s = self.offset(layer, src, kv, h, 0);
                    let d = self.offset(layer, dst, kv, h, 0);
                    match &mut self.data {
                        Store::F32(x) => x.copy_within(s..s + slots * l.head_dim, d),
                        Store::F16(x) => x.copy_within(s..s + slots * l.head_dim, d),
                    }
                }
            }
            let (k0, head_stride) = (self.offset(layer, dst, 0, 0, 0), self.head_stride());
            let data = &self.data;
            self.summaries.recompute(layer, dst, slots, |h| {
                page_keys(data, k0 + h * head_stride, l.page_size * l.head_dim)
            });
        }
    }

    /// Grows or shrinks the pool to `num_pages` pages, keeping the K/V of the pages both
    /// sizes have (a copy per (layer, head): a page's place depends on the page count).
    pub fn resize(&mut self, num_pages: usize) {
        if !self.detached {
            let l = &self.layout;
            let (blocks, per_page) = (l.num_layers * l.num_kv_heads, 2 * l.page_size * l.head_dim);
            let old = self.num_pages;
            self.data = match &self.data {
                Store::F32(d) => Store::F32(relayout(d, blocks, old, num_pages, per_page)),
                Store::F16(d) => Store::F16(relayout(d, blocks, old, num_pages, per_page)),
            };
            self.summaries.resize(num_pages);
        }
        self.num_pages = num_pages;
    }

    /// Bytes of one page across all layers.
    pub fn page_bytes(&self) -> usize {
        self.layout.bytes_per_page(self.dtype().bytes())
    }

    /// Bytes of host memory the pool holds (K/V and their key summaries).
    pub fn nbytes(&self) -> usize {
        let elems = match &self.data {
            Store::F32(d) => d.len(),
            Store::F16(d) => d.len(),
        };
        elems * self.dtype().bytes() + self.summaries.nbytes()
    }
}

/// `len` stored keys from element `at`, as f32 (what the summaries are computed from).
fn page_keys(data: &Store, at: usize, len: usize) -> Cow<'_, [f32]> {
    match data {
        Store::F32(d) => Cow::Borrowed(&d[at..at + len]),
        Store::F16(d) => {
            let mut out = vec![0.0f32; len];
            f16_to_f32(&d[at..at + len], &mut out);
            Cow::Owned(out)
        }
    }
}

/// `data` laid out `[block][page][per_page]` over `old` pages, re-laid over `new` pages: the
/// first `min(old, new)` pages of every block (a layer, or a layer's head) kept, new ones zero.
pub(crate) fn relayout<T: Copy + Default>(
    data: &[T],
    blocks: usize,
    old: usize,
    new: usize,
    per_page: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); blocks * new * per_page];
    let keep = old.min(new) * per_page;
    for b in 0..blocks {
        out[b * new * per_page..][..keep].copy_from_slice(&data[b * old * per_page..][..keep]);
    }
    out
}
