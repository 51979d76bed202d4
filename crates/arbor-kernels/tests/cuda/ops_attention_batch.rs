//! Paged attention over batches with many rows per sequence (prompts, chunks after a cache,
//! mixed with decode rows), sliding windows, shared pages, page sizes and size hints; the
//! harness is in `ops_attention`.

use crate::ops_attention::{run, shape, Hints, Pages, Seq, Shape};
use arbor_kernels::cuda::ops::attention::PREFILL_MIN_ROWS;

#[test]
fn attention_prefill_prompts() {
    for hd in [64, 128] {
        for (nh, nkv) in [(8, 8), (12, 4), (14, 2), (32, 4)] {
            let mut pg = Pages::new(40, 6);
            let seqs = vec![pg.seq(0, 100, 16), pg.seq(0, 9, 16)];
            run("prompt", shape(nh, nkv, hd), 40, &seqs, Hints::default());
        }
    }
}

#[test]
fn attention_extend_after_cache() {
    for hd in [64, 128] {
        let mut pg = Pages::new(120, 7);
        let seqs = vec![
            pg.seq(200, 37, 16),
            pg.seq(1000, 64, 16),
            pg.seq(15, 300, 16),
        ];
        let sh = Shape {
            q_scale: 2.0,
            ..shape(16, 4, hd)
        };
        run("extend", sh, 120, &seqs, Hints::default());
    }
}

#[test]
fn attention_mixed_batch() {
    // Prompts, chunks after a cache and decode rows in one call; 8 rows (the prefill
    // threshold) and 7 rows (decode) sit next to each other.
    for (nh, nkv, hd) in [(14, 2, 64), (32, 8, 128), (9, 3, 64)] {
        let mut pg = Pages::new(100, 8);
        let seqs = vec![
            pg.seq(0, 50, 16),
            pg.decode(333, 16),
            pg.seq(77, 20, 16),
            pg.decode(1, 16),
            pg.decode(17, 16),
            pg.seq(5, PREFILL_MIN_ROWS, 16),
            pg.seq(30, PREFILL_MIN_ROWS - 1, 16),
            pg.seq(0, 2, 16),
        ];
        run("mixed", shape(nh, nkv, hd), 100, &seqs, Hints::default());
    }
}

#[test]
fn attention_prefill_tile_boundaries() {
    for hd in [64, 128] {
        for (nh, nkv) in [(4, 4), (12, 4), (16, 2)] {
            let tile_rows = 16 * (256 / hd) / (nh / nkv);
            for rows in [tile_rows - 1, tile_rows, tile_rows + 1, 2 * tile_rows + 3] {
                let rows = rows.max(PREFILL_MIN_ROWS);
                let mut pg = Pages::new(60, 9);
                let seqs = vec![pg.seq(40, rows, 16), pg.seq(0, rows + 1, 16)];
                run(
                    &format!("tile of {tile_rows} rows, {rows} rows"),
                    shape(nh, nkv, hd),
                    60,
                    &seqs,
                    Hints::default(),
                );
            }
        }
    }
}

#[test]
fn attention_sliding_window() {
    for window in [1, 7, 32, 100] {
        for hd in [64, 128] {
            let mut pg = Pages::new(80, 10);
            let seqs = vec![
                pg.decode(300, 16),
                pg.decode(5, 16),
                pg.seq(0, 70, 16),
                pg.seq(150, 40, 16),
                pg.decode(33, 16),
            ];
            let sh = Shape {
                window: Some(window),
                ..shape(16, 4, hd)
            };
            run("window", sh, 80, &seqs, Hints::default());
        }
    }
}

#[test]
fn attention_shared_pages() {
    // A search tree: four branches share a 5-page prefix (80 positions) and end in tails of
    // their own; two more sequences share the prefix and a partial page, one decoding, one
    // extending.
    for (nh, nkv, hd) in [(14, 2, 64), (32, 8, 128)] {
        let mut pg = Pages::new(60, 11);
        let prefix = pg.take(5);
        let mut seqs: Vec<Seq> = [81, 95, 96, 150]
            .iter()
            .map(|&len: &usize| {
                let mut pages = prefix.clone();
                pages.extend(pg.take(len.div_ceil(16) - 5));
                Seq {
                    pages,
                    positions: vec![len - 1],
                }
            })
            .collect();
        let mut shared = prefix.clone();
        shared.extend(pg.take(1)); // positions 80..96, partly filled by both
        seqs.push(Seq {
            pages: shared.clone(),
            positions: vec![85],
        });
        seqs.push(Seq {
            pages: shared,
            positions: (84..96).collect(),
        });
        run("shared", shape(nh, nkv, hd), 60, &seqs, Hints::default());
    }
}

#[test]
fn attention_page_sizes() {
    for page_size in [8, 32] {
        for hd in [64, 128] {
            let mut pg = Pages::new(120, 12);
            let seqs = vec![
                pg.decode(1, page_size),
                pg.decode(page_size + 1, page_size),
                pg.decode(3 * page_size - 1, page_size),
                pg.seq(page_size - 3, 29, page_size),
                pg.seq(2 * page_size + 5, 11, page_size),
            ];
            let sh = Shape {
                page_size,
                ..shape(12, 4, hd)
            };
            run("page size", sh, 120, &seqs, Hints::default());
        }
    }
}

#[test]
fn attention_low_hints() {
    // Hints below the truth cost speed, never correctness: all rows through the decode
    // kernel; a prefill grid sized for fewer tiles; decode blocks of one warp.
    let mut pg = Pages::new(60, 13);
    let seqs = vec![pg.seq(10, 20, 16), pg.decode(500, 16), pg.seq(0, 100, 16)];
    let sh = shape(16, 4, 128);
    for (max_rows, max_ctx) in [
        (Some(1), None),
        (Some(PREFILL_MIN_ROWS), None),
        (None, Some(1)),
    ] {
        let hints = Hints {
            max_rows_per_seq: max_rows,
            max_context: max_ctx,
        };
        run(
            &format!("hints rows {max_rows:?} ctx {max_ctx:?}"),
            sh,
            60,
            &seqs,
            hints,
        );
    }
}
