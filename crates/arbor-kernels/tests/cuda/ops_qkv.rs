//! The fused q/k/v stage (bias, q/k norm, RoPE, KV store) against the CPU decoder layer's
//! steps: bias add, `rms_norm_rows`, `RopeTable::apply`, `KvPool::write`. q is compared in f32
//! (`NMSE_F32`), the whole pool in bf16 (`check_bf16`); slots no row writes must stay zero.

use crate::common::{self, random};
use crate::ops_common::*;
use arbor_kernels::cuda::ops::qkv::{qkv_rope_store, QkvParams, QkvWeights};
use arbor_kernels::cuda::GpuKvPool;
use arbor_kernels::kv::{KvLayout, KvPool, PageId};
use arbor_kernels::ops::{self, RopeLayout, RopeScaling, RopeTable};

struct Case {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    layout: RopeLayout,
    scaling: RopeScaling,
    bias: bool,
    qk_norm: bool,
}

const EPS: f32 = 1e-6;
const PAGE: usize = 16;

fn run(case: &Case, rows: usize, first_pos: usize, seed: u64) {
    let Some(gpu) = common::gpu() else { return };
    let Case {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        ..
    } = *case;
    let (qd, kvd) = (nh * hd, nkv * hd);
    let width = qd + 2 * kvd;
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: nkv,
        head_dim: hd,
        page_size: PAGE,
    };
    let num_pages = rows.div_ceil(PAGE) * 2 + 3;
    let layer = 1;
    let rope = RopeTable::new(case.layout, case.rot_dim, 10000.0, &case.scaling);
    let qkv = random(rows * width, seed, 2.0);
    let bias = random(width, seed + 1, 0.5);
    let q_norm = random(hd, seed + 2, 1.5);
    let k_norm = random(hd, seed + 3, 1.5);
    // Positions rise from first_pos with a gap; slots scatter rows over pages backwards, the
    // last row is a padding row whose K/V must not be stored.
    let positions: Vec<usize> = (0..rows).map(|r| first_pos + r + r / 5).collect();
    let pad_row = rows > 1;
    let slots: Vec<u32> = (0..rows)
        .map(|r| {
            if pad_row && r == rows - 1 {
                u32::MAX
            } else {
                ((num_pages - 1 - r / PAGE) * PAGE + (r * 7) % PAGE) as u32
            }
        })
        .collect();

    // CPU: the decoder layer's steps.
    let (mut q, mut k, mut v) = (
        vec![0.0; rows * qd],
        vec![0.0; rows * kvd],
        vec![0.0; rows * kvd],
    );
    for r in 0..rows {
        let mut row = qkv[r * width..(r + 1) * width].to_vec();
        if case.bias {
            row.iter_mut().zip(&bias).for_each(|(a, b)| *a += b);
        }
        q[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
        k[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
        v[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
    }
    if case.qk_norm {
        ops::rms_norm_rows(&mut q, &q_norm, EPS);
        ops::rms_norm_rows(&mut k, &k_norm, EPS);
    }
    rope.apply(&mut q, &positions, nh, hd);
    rope.apply(&mut k, &positions, nkv, hd);
    let mut host = KvPool::new(layout, num_pages);
    for r in 0..rows {
        if slots[r] as usize >= num_pages * PAGE {
            continue;
        }
        let (page, slot) = (slots[r] as usize / PAGE, slots[r] as usize % PAGE);
        let kr = &k[r * kvd..(r + 1) * kvd];
        let vr = &v[r * kvd..(r + 1) * kvd];
        host.write(layer, page as PageId, slot, kr, vr);
    }

    // GPU.
    let mut pool = GpuKvPool::new(&gpu, layout, num_pages).expect("pool");
    let (dbias, dqn, dkn) = (up(&gpu, &bias), up(&gpu, &q_norm), up(&gpu, &k_norm));
    let w = QkvWeights {
        bias: case.bias.then_some(&dbias),
        q_norm: case.qk_norm.then_some(&dqn),
        k_norm: case.qk_norm.then_some(&dkn),
        inv_freq: &up(&gpu, rope.inv_freq()),
    };
    let p = QkvParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        rot_dim: case.rot_dim,
        layout: case.layout,
        eps: EPS,
    };
    let pos32: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let mut q_out = zeros(&gpu, rows * qd + 3);
    qkv_rope_store(
        &gpu,
        &up(&gpu, &qkv),
        rows,
        &p,
        &w,
        &up(&gpu, &pos32),
        &up(&gpu, &slots),
        &mut pool,
        layer,
        &mut q_out,
    )
    .expect("qkv_rope_store");

    let what = format!(
        "qkv {nh}/{nkv} heads × {hd} rot {} {:?} {:?} bias {} qk_norm {} rows {rows} from {first_pos}",
        case.rot_dim, case.layout, case.scaling, case.bias, case.qk_norm
    );
    check(
        &format!("{what}: q"),
        &down(&gpu, &q_out, rows * qd),
        &q,
        NMSE_F32,
    );
    let want = flat_pool(&host);
    let got = down_bf16(&gpu, &pool.data, want.len());
    if let Some(i) = (0..want.len()).find(|&i| want[i] == 0.0 && got[i] != 0.0) {
        panic!(
            "{what}: pool element {i} was written ({}) but no row maps there",
            got[i]
        );
    }
    check_bf16(&format!("{what}: pool"), &got, &want);
}

fn case(nh: usize, nkv: usize, hd: usize, layout: RopeLayout) -> Case {
    Case {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        rot_dim: hd,
        layout,
        scaling: RopeScaling::None,
        bias: false,
        qk_norm: false,
    }
}

#[test]
fn qkv_neox_plain() {
    for (nh, nkv, hd) in [
        (8, 8, 64),
        (9, 3, 64),
        (14, 2, 64),
        (32, 8, 128),
        (12, 4, 128),
    ] {
        for rows in [1, 7, 64] {
            run(
                &case(nh, nkv, hd, RopeLayout::Neox),
                rows,
                0,
                (nh * rows) as u64,
            );
        }
    }
}

#[test]
fn qkv_interleaved_with_bias() {
    for (nh, nkv, hd) in [(9, 3, 64), (14, 2, 64), (28, 4, 128)] {
        for rows in [1, 7, 64] {
            let c = Case {
                bias: true,
                ..case(nh, nkv, hd, RopeLayout::Interleaved)
            };
            run(&c, rows, 5, (nh * rows + 1) as u64);
        }
    }
}

#[test]
fn qkv_neox_bias_and_qk_norm() {
    // Qwen2 (bias) and Qwen3 (q/k norm) shapes, both switches in every combination.
    for (nh, nkv, hd) in [(14, 2, 64), (16, 8, 128), (32, 4, 128)] {
        for (bias, qk_norm) in [(true, false), (false, true), (true, true)] {
            let c = Case {
                bias,
                qk_norm,
                ..case(nh, nkv, hd, RopeLayout::Neox)
            };
            run(&c, 7, 100, (nh + hd) as u64);
            run(&c, 64, 0, (nh + hd + 1) as u64);
        }
    }
}

#[test]
fn qkv_rope_scaling_and_far_positions() {
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192,
    };
    for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
        for scaling in [llama3.clone(), RopeScaling::Linear { factor: 4.0 }] {
            let c = Case {
                scaling,
                ..case(32, 8, 128, layout)
            };
            run(&c, 7, 100_000, 11);
            run(&c, 64, 31_000, 12);
        }
    }
}

#[test]
fn qkv_partial_rotary_and_other_head_dims() {
    for (hd, rot) in [
        (64, 32),
        (128, 64),
        (96, 96),
        (256, 256),
        (80, 80),
        (128, 0),
    ] {
        for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
            let c = Case {
                rot_dim: rot,
                qk_norm: true,
                ..case(8, 2, hd, layout)
            };
            run(&c, 7, 3, (hd + rot) as u64);
        }
    }
}

#[test]
fn qkv_rejects_bad_shapes() {
    let Some(gpu) = common::gpu() else { return };
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: PAGE,
    };
    let mut pool = GpuKvPool::new(&gpu, layout, 4).expect("pool");
    let inv = up(&gpu, &[1.0f32; 32]);
    let w = QkvWeights {
        bias: None,
        q_norm: None,
        k_norm: None,
        inv_freq: &inv,
    };
    let mut p = QkvParams {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rot_dim: 64,
        layout: RopeLayout::Neox,
        eps: EPS,
    };
    let (qkv, idx) = (zeros::<f32>(&gpu, 8 * 512), zeros::<u32>(&gpu, 8));
    let mut q = zeros::<f32>(&gpu, 8 * 256);
    let mut go = |p: &QkvParams, rows, layer| {
        qkv_rope_store(
            &gpu, &qkv, rows, p, &w, &idx, &idx, &mut pool, layer, &mut q,
        )
    };
    go(&p, 8, 0).expect("a valid call");
    for (e, why) in [
        (go(&p, 9, 0), "too many rows"),
        (go(&p, 8, 1), "layer"),
        (
            {
                p.n_kv_heads = 4;
                go(&p, 1, 0)
            },
            "pool",
        ),
    ] {
        let e = e.expect_err(why);
        println!("{why}: {e}");
        assert!(e.to_string().contains("qkv_rope_store"), "{e}");
    }
}
