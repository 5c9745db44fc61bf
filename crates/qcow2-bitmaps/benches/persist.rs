//! Store/load timings on a real (sparse) qcow2 file: a 16 TiB disk at 64 KiB granularity
//! with 1 %, 50 % and 100 % of the granules dirty, and an open with 100 bitmaps.
//! Run with `cargo bench -p qcow2-bitmaps`; prints one line per case.

use std::time::Instant;

use qcow2::{CreateOptions, OpenOptions, Qcow2Image};
use qcow2_bitmaps::{AddOptions, Bitmaps};

const TIB: u64 = 1 << 40;
const G: u64 = 65536;

fn open(p: &std::path::Path, read_only: bool) -> Qcow2Image {
    Qcow2Image::open(
        p,
        &OpenOptions {
            read_only,
            known_autoclear: qcow2_bitmaps::KNOWN_AUTOCLEAR,
            ..OpenOptions::default()
        },
    )
    .expect("open")
}

fn new_image(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    qcow2::create(
        &p,
        &CreateOptions {
            size,
            cluster_size: 65536,
            ..CreateOptions::default()
        },
    )
    .expect("create");
    p
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * TIB;
    for (label, every) in [("1%", 100u64), ("50%", 2), ("100%", 1)] {
        let p = new_image(dir.path(), &format!("d{every}.qcow2"), size);
        let img = open(&p, false);
        let set = Bitmaps::open(&img, "bench").expect("open bitmaps");
        set.add(
            &img,
            "b",
            AddOptions {
                granularity: Some(G),
                ..AddOptions::default()
            },
        )
        .expect("add");
        let bm = set.bitmap("b").expect("bitmap");
        if every == 1 {
            bm.set_range(0, size);
        } else {
            let granules = size / G;
            let mut k = 0;
            while k < granules {
                bm.set_range(k * G, G);
                k += every;
            }
        }
        let t = Instant::now();
        set.store(&img).expect("store");
        let store = t.elapsed();
        drop(set);
        drop(img);
        let img = open(&p, true);
        let t = Instant::now();
        let set = Bitmaps::open(&img, "bench").expect("load");
        let load = t.elapsed();
        let n = set.bitmap("b").expect("b").count();
        println!(
            "16 TiB @ 64 KiB, {label:>4} dirty ({n} bits, 32 MiB bitmap): store {:>8.1} ms, load {:>8.1} ms",
            store.as_secs_f64() * 1e3,
            load.as_secs_f64() * 1e3
        );
    }
    // 100 bitmaps on a 1 TiB disk at 64 KiB (2 MiB each), each with a few dirty granules.
    let p = new_image(dir.path(), "many.qcow2", TIB);
    {
        let img = open(&p, false);
        let set = Bitmaps::open(&img, "bench").expect("open");
        for i in 0..100u64 {
            set.add(
                &img,
                &format!("bm{i}"),
                AddOptions {
                    granularity: Some(G),
                    ..AddOptions::default()
                },
            )
            .expect("add");
        }
        for i in 0..100u64 {
            set.mark(i * (TIB / 100), 1 << 20);
        }
        set.store(&img).expect("store");
    }
    let img = open(&p, false);
    let t = Instant::now();
    let set = Bitmaps::open(&img, "bench").expect("open rw");
    let open_rw = t.elapsed();
    let t = Instant::now();
    set.store(&img).expect("store");
    let store = t.elapsed();
    println!(
        "100 bitmaps (1 TiB @ 64 KiB): open read-write + IN_USE {:>8.1} ms, store {:>8.1} ms",
        open_rw.as_secs_f64() * 1e3,
        store.as_secs_f64() * 1e3
    );
    drop(set);
    // The same open with the crash-consistency shadow (arming included), then a "crash"
    // (the set dropped unstored, the shadow holding 100 regions) and the recovering open.
    let opts = qcow2_bitmaps::OpenOptions {
        crash_consistent: true,
        ..qcow2_bitmaps::OpenOptions::default()
    };
    let t = Instant::now();
    let set = Bitmaps::open_with(&img, "bench", opts).expect("open with shadow");
    let open_shadow = t.elapsed();
    let shadow = set.shadow().expect("shadow").clone();
    std::thread::scope(|sc| {
        sc.spawn(|| shadow.run_syncer(&img));
        for i in 0..100u64 {
            shadow.cover(i * (TIB / 100) + G, 4096).expect("cover");
        }
        shadow.shutdown();
    });
    drop(set);
    let t = Instant::now();
    let set = Bitmaps::open_with(&img, "bench", opts).expect("recovering open");
    let open_recover = t.elapsed();
    assert_eq!(set.recovered().len(), 100, "every bitmap recovered");
    set.store(&img).expect("store");
    println!(
        "100 bitmaps (1 TiB @ 64 KiB), crash-consistency shadow on: open read-write + \
         shadow + IN_USE {:>8.1} ms, open recovering all 100 after a crash {:>8.1} ms",
        open_shadow.as_secs_f64() * 1e3,
        open_recover.as_secs_f64() * 1e3
    );
}
