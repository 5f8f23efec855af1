//! Continuous rootkit detection in vmwatchd (issue 6): the daemon scans a
//! watched lab VM every second without pausing it; loading a test rootkit
//! (guest/kmods/rk_inline, which makes `uname -n` lie) raises a `new` alert
//! naming the hooked function and the module within the detection goal,
//! and unloading it raises `gone`.
#![allow(clippy::duplicate_mod)]
mod common;

use std::time::{Duration, Instant};

use common::{Daemon, TempRoot};
use lab::UpOptions;
use labtest::{copy_kmod, sh, up, Down};

#[test]
fn continuous_scan_alerts_on_insmod_and_rmmod_within_two_seconds_6_1() {
    alerts_on_insmod_and_rmmod(lab::Flavour::Stable, "s");
}

#[test]
fn continuous_scan_alerts_on_insmod_and_rmmod_within_two_seconds_6_12() {
    alerts_on_insmod_and_rmmod(lab::Flavour::Backports, "b");
}

/// One VM at a time: the latency bound is about scanning, not about two
/// emulated guests sharing two cores.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alerts_on_insmod_and_rmmod(flavour: lab::Flavour, tag: &str) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let root = TempRoot::new(&format!("integrity{tag}"));
    let mut opts = UpOptions::new(&format!("t-ig{tag}{}", std::process::id()));
    opts.flavour = flavour;
    opts.network = false;
    let vm = Down(up(&opts));
    let vm = &vm.0;
    copy_kmod(vm, "rk_inline");

    let state = root.0.join("state");
    let daemon = Daemon::start(
        &state,
        None,
        &["--watch", vm.name(), "--scan-interval-ms", "1000"],
    );
    let c = daemon.client();
    let path = format!("/v1/vms/{}/integrity", vm.name());
    // A clean guest: scans run and find nothing.
    assert!(
        common::eventually(Duration::from_secs(60), || {
            c.call("GET", &path, None)
                .is_ok_and(|r| r["scans"].as_u64().unwrap_or(0) >= 3)
        }),
        "no scans: {:?}",
        c.call("GET", &path, None)
    );
    let r = c.call("GET", &path, None).unwrap();
    assert_eq!(
        r["last_report"]["findings"].as_array().map(Vec::len),
        Some(0),
        "{r}"
    );
    // The syscall-entry MSRs were checked too (the hook plugin saw the
    // kernel write them at boot), with page-table isolation on.
    assert!(
        r["last_report"]["coverage"]["entry_msr_writes"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{r}"
    );
    assert_eq!(r["interval_ms"], 1000);
    let before = c.call("GET", "/v1/integrity/alerts", None).unwrap();
    assert_eq!(before.as_array().map(Vec::len), Some(0), "{before}");

    // insmod -> alert: latency from insmod's return to the alert.
    sh(vm, "insmod /root/rk_inline.ko");
    let loaded = Instant::now();
    assert_eq!(
        sh(vm, "uname -n").trim(),
        "rk-inline-owned",
        "the rootkit works"
    );
    let alerts = c
        .call(
            "GET",
            &format!("/v1/integrity/alerts?since=0&vm={}&wait=10", vm.name()),
            None,
        )
        .unwrap();
    let latency = loaded.elapsed();
    let a = &alerts[0];
    assert_eq!(a["change"], "new", "{alerts}");
    assert_eq!(a["finding"]["check"], "inline-hook", "{alerts}");
    assert_eq!(a["finding"]["module"], "rk_inline", "{alerts}");
    assert!(
        a["finding"]["object"]
            .as_str()
            .unwrap()
            .starts_with("__x64_sys_newuname"),
        "{alerts}"
    );
    eprintln!(
        "detection latency: {} ms (scan interval 1000 ms)",
        latency.as_millis()
    );
    assert!(
        latency < Duration::from_secs(2),
        "detected after {latency:?}"
    );
    // The guest ran throughout (vmwatch never stops it).
    let status = vm.qmp().unwrap().status().unwrap();
    assert_eq!(format!("{:?}", status.status), "running");

    sh(vm, "rmmod rk_inline");
    let seq = a["seq"].as_u64().unwrap();
    let gone = c
        .call(
            "GET",
            &format!("/v1/integrity/alerts?since={seq}&wait=10"),
            None,
        )
        .unwrap();
    assert_eq!(gone[0]["change"], "gone", "{gone}");
    assert_eq!(gone[0]["finding"]["module"], "rk_inline", "{gone}");
}
