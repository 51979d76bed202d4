//! Copy-on-write page copies against the host pool's `copy_page` (exact), and their checks.

use crate::common;
use crate::ops_common::*;
use arbor_kernels::cuda::ops::kv;
use arbor_kernels::kv::KvLayout;

#[test]
fn copy_pages_matches_host() {
    let Some(gpu) = common::gpu() else { return };
    for (layers, kv_heads, head_dim, page_size) in [(2, 2, 64, 16), (3, 8, 128, 8), (1, 1, 32, 32)]
    {
        let layout = KvLayout {
            num_layers: layers,
            num_kv_heads: kv_heads,
            head_dim,
            page_size,
        };
        let num_pages = 12;
        let (mut host, mut dev) = random_pools(&gpu, layout, num_pages, 77);
        // A partial page, a full one, an empty one, and one source copied twice (a fork into
        // two children).
        let copies = [
            (3, 7, (page_size / 2 + 1) as u32),
            (0, 11, page_size as u32),
            (5, 1, 0),
            (3, 9, 1),
        ];
        for &(s, d, n) in &copies {
            host.copy_page(s, d, n as usize);
        }
        kv::copy_pages(&gpu, &mut dev, &copies).expect("copy_pages");
        let want = flat_pool(&host);
        let got = down_bf16(&gpu, &dev.data, want.len());
        check_exact(
            &format!(
                "copy_pages {layers} layers × {kv_heads} heads × {head_dim}, page {page_size}"
            ),
            &got,
            &want,
        );
    }
}

#[test]
fn copy_pages_rejects_bad_lists() {
    let Some(gpu) = common::gpu() else { return };
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 32,
        page_size: 16,
    };
    let (_, mut dev) = random_pools(&gpu, layout, 4, 1);
    for (copies, why) in [
        (vec![(0, 4, 1)], "beyond"),
        (vec![(0, 1, 17)], "slots"),
        (vec![(0, 1, 1), (2, 1, 1)], "destination of two"),
        (
            vec![(0, 1, 1), (1, 2, 1)],
            "both a source and a destination",
        ),
        (vec![(2, 2, 1)], "both a source and a destination"),
    ] {
        let e = kv::copy_pages(&gpu, &mut dev, &copies).expect_err("a bad copy list");
        println!("{copies:?}: {e}");
        assert!(e.to_string().contains(why), "{copies:?}: {e}");
    }
    kv::copy_pages(&gpu, &mut dev, &[]).expect("an empty list is fine");
}
