//! Seeded random workloads (writes, write-zeroes, discards, flushes) checked against an
//! in-memory model, then against QEMU's own reading and `qemu-img check`.

mod common;
use common::workload::*;
use proptest::prelude::*;
use qcow2::*;
use std::path::Path;

fn setup(
    dir: &Path,
    cluster: u64,
    refbits: u32,
    v3: bool,
    backing: bool,
    size: u64,
) -> (std::path::PathBuf, Option<Vec<u8>>) {
    let p = dir.join("img.qcow2");
    let mut base_data = None;
    let mut opts = CreateOptions {
        size,
        cluster_size: cluster,
        refcount_bits: refbits,
        version: if v3 { 3 } else { 2 },
        ..Default::default()
    };
    if backing {
        let b = dir.join("base.raw");
        let data = pattern(0, size, 0x5a);
        std::fs::write(&b, &data).unwrap();
        base_data = Some(data);
        opts.backing = Some(("base.raw".into(), Some("raw".into())));
    }
    create(&p, &opts).unwrap();
    (p, base_data)
}

fn run_workload(seed: u64, n: usize, cluster: u64, refbits: u32, v3: bool, backing: bool) {
    let size = 8 << 20;
    let d = tempfile::tempdir().unwrap();
    let (p, base) = setup(d.path(), cluster, refbits, v3, backing, size);
    let mut model = Model::new(size, cluster, v3, base);
    let ops = generate(seed, n, size, cluster);
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        let each = std::env::var("WORKLOAD_CHECK_EACH").is_ok();
        let trace = std::env::var("WORKLOAD_TRACE").is_ok();
        for (i, op) in ops.iter().enumerate() {
            let t0 = std::time::Instant::now();
            execute(&img, op);
            if trace {
                eprintln!(
                    "op {i} {op:?} {:?} file {}",
                    t0.elapsed(),
                    std::fs::metadata(&p).unwrap().len()
                );
            }
            model.apply(op);
            if each {
                if let Some(b) = first_diff(&read_all(&img), &model.data) {
                    panic!("seed {seed}: op {i} {op:?} diverged at byte {b:#x}");
                }
            }
        }
        let got = read_all(&img);
        if let Some(i) = first_diff(&got, &model.data) {
            panic!("seed {seed}: engine reads differ from the model at byte {i:#x}");
        }
    }
    if common::require_tool("qemu-img") {
        common::assert_clean(&p);
        let raw = common::qemu_raw(&p);
        if let Some(i) = first_diff(&raw, &model.data) {
            panic!("seed {seed}: QEMU reads differ from the model at byte {i:#x}");
        }
        // And qemu-img compare agrees with the model written as a raw file.
        let m = d.path().join("model.raw");
        std::fs::write(&m, &model.data).unwrap();
        common::run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                m.to_str().unwrap(),
                p.to_str().unwrap(),
            ],
        );
    }
}

#[test]
fn workload_64k_clusters() {
    for seed in 0..4 {
        run_workload(seed, 300, 65536, 16, true, false);
    }
}

#[test]
fn workload_small_clusters_grow_refcount_table() {
    // 512-byte clusters with 1-bit refcounts: every few writes need a new refcount
    // block and the refcount table must grow several times.
    run_workload(11, 400, 512, 1, true, false);
    run_workload(12, 300, 512, 64, true, false);
    run_workload(13, 300, 4096, 2, true, false);
}

#[test]
fn workload_over_backing_file() {
    run_workload(21, 300, 65536, 16, true, true);
    run_workload(22, 300, 4096, 8, true, true);
}

#[test]
fn workload_v2() {
    run_workload(31, 300, 65536, 16, false, false);
    run_workload(32, 300, 65536, 16, false, true);
}

#[test]
fn workload_2m_clusters() {
    run_workload(41, 100, 2 << 20, 32, true, false);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_workloads_match_the_model(
        seed in any::<u64>(),
        n in 1usize..80,
        cbits in prop::sample::select(vec![9u32, 12, 16]),
        rorder in 0u32..7,
        v3 in any::<bool>(),
        backing in any::<bool>(),
    ) {
        let refbits = if v3 { 1 << rorder } else { 16 };
        run_workload(seed, n, 1 << cbits, refbits, v3, backing);
    }
}
