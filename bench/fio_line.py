#!/usr/bin/env python3
"""Turns one fio JSON result into a vhost-blk-bench style key=value line.

usage: fio_line.py LABEL JOB FIO.json
CPU per I/O is fio's own usr+sys time (it does the I/O itself) over its completed I/Os.
"""
import json
import sys

label, job, path = sys.argv[1:4]
with open(path) as f:
    j = json.load(f)["jobs"][0]
side = j["read"] if j["read"]["total_ios"] > 0 else j["write"]
ios = side["total_ios"]
secs = j["job_runtime"] / 1000.0
lat = side["lat_ns"]
pct = lat.get("percentile", {})
cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * secs
print(
    f"label={label} job={job} iops={side['iops']:.0f} mbps={side['bw_bytes'] / 1e6:.1f} "
    f"mean_us={lat['mean'] / 1e3:.1f} p50_us={pct.get('50.000000', 0) / 1e3:.1f} "
    f"p99_us={pct.get('99.000000', 0) / 1e3:.1f} cpu_us_per_io={cpu * 1e6 / max(ios, 1):.2f} "
    f"ios={ios} errors={j['error']}"
)
