//! `vhost-blk-bench`: runs workloads against a vhost-user-blk socket and prints one
//! `key=value` line per job.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_blk_bench::conn::connect;
use vhost_blk_bench::error::Result;
use vhost_blk_bench::guest::GuestMem;
use vhost_blk_bench::job::{run_job, JobSpec, RunTimes};
use vhost_blk_bench::vq::MEM_SIZE;

/// Load generator for vhost-user-blk servers.
#[derive(Debug, Parser)]
#[command(name = "vhost-blk-bench", version, about)]
struct Cli {
    /// vhost-user-blk socket of the server.
    #[arg(short, long)]
    socket: PathBuf,
    /// Server process id: its CPU time (all threads) is sampled around each job.
    #[arg(long)]
    pid: Option<u32>,
    /// Jobs, comma-separated, each PATTERN-BS-qdN (PATTERN: randread, randwrite, read,
    /// write).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32,write-1m-qd8"
    )]
    jobs: Vec<String>,
    /// Measured seconds per job.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Unmeasured warm-up seconds before each job.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// Negotiate INFLIGHT_SHMFD when the server offers it (a region fetched and handed
    /// back, as QEMU and cloud-hypervisor do): the server then tracks every request.
    #[arg(long)]
    inflight: bool,
    /// Label printed on every line (e.g. the server's name).
    #[arg(long, default_value = "-")]
    label: String,
}

fn run(cli: &Cli) -> Result<bool> {
    let jobs = cli
        .jobs
        .iter()
        .map(|j| JobSpec::parse(j))
        .collect::<Result<Vec<_>>>()?;
    let bad_time = |name: &str, v: f64| {
        vhost_blk_bench::error::BenchError::Invalid(format!(
            "--{name} {v}: must be a finite number of seconds >= 0"
        ))
    };
    let secs = |name: &str, v: f64| Duration::try_from_secs_f64(v).map_err(|_| bad_time(name, v));
    let times = RunTimes {
        ramp: secs("ramp", cli.ramp)?,
        runtime: secs("runtime", cli.runtime)?,
        timeout: Duration::from_secs(30),
    };
    let mem = GuestMem::new(MEM_SIZE)?;
    let (conn, mut q) = connect(&cli.socket, &mem, !cli.no_event_idx, cli.inflight)?;
    let mut ok = true;
    for (i, spec) in jobs.iter().enumerate() {
        let r = run_job(
            &mut q,
            &mem,
            spec,
            conn.capacity,
            times,
            cli.pid,
            0x9e37_79b9_7f4a_7c15 ^ i as u64,
        )?;
        let cpu = r
            .cpu_us_per_io
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        println!(
            "label={} job={} iops={:.0} mbps={:.1} mean_us={:.1} p50_us={:.1} p99_us={:.1} cpu_us_per_io={} ios={} errors={} kicks_per_io={:.3} event_idx={}",
            cli.label,
            spec.name,
            r.iops(),
            r.iops() * spec.block as f64 / 1e6,
            r.mean_us,
            r.p50_us,
            r.p99_us,
            cpu,
            r.ios,
            r.errors,
            r.kicks_per_io,
            conn.features & (1 << 29) != 0,
        );
        ok &= r.errors == 0;
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vhost-blk-bench: some requests failed (errors > 0)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vhost-blk-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
