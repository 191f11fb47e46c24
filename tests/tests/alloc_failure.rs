//! Memory taken away between the plan and the allocation (another process on a shared GPU, a
//! host near its limit): the load fails naming the unit and device, frees every buffer it had
//! allocated, and the same process loads again through the library.
//!
//! The moment is the load's own [`LoadStage::Allocating`] progress event, which the loading
//! thread waits on: the plan is made, nothing is allocated yet. On a GPU another process (this
//! test binary, started again as `hog_device_memory`) takes all but 1, 3 or 5 GiB of the free
//! memory, so the failure comes at layer 0, 1 or 2;
//! on the host the process's address-space limit is lowered. Both tests change process-wide
//! state, so they take turns.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use weightsmith::gpu_mem::cuda::{Context, DeviceAlloc};
use weightsmith::plan::SeqLen;
use weightsmith::{load, Error, LoadOptions, LoadStage, PlanOptions};
use weightsmith_tests::{fixture, gpu_available};

static TURN: Mutex<()> = Mutex::new(());

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// tiny-llama's three layers with a KV cache of `tokens` × `batch`: 128 bytes a token a layer.
fn with_cache(tokens: u64, batch: u64) -> LoadOptions {
    LoadOptions {
        plan: PlanOptions {
            seq_len: SeqLen::Tokens(tokens),
            batch,
            ..PlanOptions::default()
        },
        verify: true,
        ..LoadOptions::default()
    }
}

/// The error of a load that must fail, as (unit, device, message).
fn load_error(e: Error) -> (String, String, String) {
    match e {
        Error::Load {
            unit,
            device,
            message,
        } => (unit, device, message),
        other => panic!("not a load error naming the unit and device: {other}"),
    }
}

#[test]
fn device_memory_taken_after_the_plan_fails_naming_the_unit_frees_all_and_loads_again() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    if !gpu_available() {
        return;
    }
    let ctx = Context::new(0).unwrap();
    // Each layer's cache is 2 GiB (16 Mi tokens). The hog leaves 1, 3 or 5 GiB: the weights
    // and the caches of the layers before layer k fit, layer k's cache does not.
    let options = with_cache(4 << 20, 4);
    for k in 0..3u64 {
        let leave = (2 * k + 1) * GIB;
        let mut hog = None;
        let mut free_hogged = 0;
        let result = load(fixture("models/tiny-llama"), &options, &mut |p| {
            if p.stage != LoadStage::Allocating {
                return;
            }
            let exe = std::env::current_exe().unwrap();
            let mut child = Command::new(exe)
                .args(["hog_device_memory", "--exact", "--ignored", "--nocapture"])
                .env("WEIGHTSMITH_TEST_HOG_LEAVE", leave.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            while !line.starts_with("taken") {
                line.clear();
                assert!(
                    out.read_line(&mut line).unwrap() > 0,
                    "the hog process ended without taking memory"
                );
            }
            free_hogged = ctx.mem_info().unwrap().0;
            hog = Some((child, out));
        });
        let (mut hog, mut hog_out) = hog.expect("the load reported its allocating stage");
        let free_after_failure = ctx.mem_info().unwrap().0;
        // Release the hog before any assertion can fail.
        drop(hog.stdin.take());
        let mut rest = String::new();
        hog_out.read_to_string(&mut rest).unwrap();
        assert!(hog.wait().unwrap().success(), "the hog process: {rest}");
        let (unit, device, message) = load_error(match result {
            Ok(_) => panic!("loaded with {} MiB free", free_hogged / MIB),
            Err(e) => e,
        });
        eprintln!("{leave} bytes left: loading {unit} onto {device}: {message}");
        assert_eq!((unit, device.as_str()), (format!("layers.{k}"), "cuda:0"));
        assert!(
            message.starts_with(
                "cannot allocate 2.00 GiB of device memory: CUDA_ERROR_OUT_OF_MEMORY; cuda:0 has "
            ),
            "{message}"
        );
        assert!(
            message.contains("the plan found") && message.contains("another process"),
            "{message}"
        );
        // Everything allocated before the failure (the weights, the caches of layers before
        // k) is free again: the device has what it had once the hog had taken its share.
        assert!(
            free_after_failure + 64 * MIB >= free_hogged,
            "{} MiB free after the failure, {} MiB before the allocation",
            free_after_failure / MIB,
            free_hogged / MIB
        );
    }
    // The same process loads the same model with the same plan, and reads every tensor back.
    let loaded = load(fixture("models/tiny-llama"), &options, &mut |_| {}).unwrap();
    assert_eq!(loaded.report.verified_tensors, Some(loaded.tensors.len()));
    assert_eq!(loaded.caches.len(), 3);
    assert!(loaded
        .caches
        .iter()
        .all(|c| c.buffer.len() as u64 == 2 * GIB));
    let d = &loaded.report.devices[0];
    assert_eq!(d.allocated_bytes, d.planned_bytes);
}

/// The other process of the test above: takes all but `WEIGHTSMITH_TEST_HOG_LEAVE` bytes of
/// cuda:0's free memory, says `taken`, and holds it until its stdin closes.
#[test]
#[ignore = "started by device_memory_taken_after_the_plan_…, not on its own"]
fn hog_device_memory() {
    let Some(leave) = std::env::var_os("WEIGHTSMITH_TEST_HOG_LEAVE") else {
        return;
    };
    let leave: u64 = leave.to_str().unwrap().parse().unwrap();
    let ctx = Context::new(0).unwrap();
    let free = ctx.mem_info().unwrap().0;
    let held = DeviceAlloc::new(&ctx, free.saturating_sub(leave) as usize).unwrap();
    println!("taken {}", held.len());
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
}

/// The process's virtual size, from /proc.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn set_address_space_limit(bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit for this process; the soft limit stays under the hard one.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
}

#[test]
fn host_memory_short_after_the_plan_fails_naming_the_unit_and_loads_again() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // Each layer's cache is 128 MB (1 M tokens); after the plan the process may grow by
    // 192 MiB more, so layer 0 and its cache fit and layer 1's cache does not.
    let options = LoadOptions {
        host_only: true,
        ..with_cache(1_000_000, 1)
    };
    let mut before_allocating = None;
    let result = load(fixture("models/tiny-llama"), &options, &mut |p| {
        if p.stage == LoadStage::Allocating {
            let size = vm_size();
            set_address_space_limit(size + 192 * MIB);
            before_allocating = Some(size);
        }
    });
    let after_failure = vm_size();
    set_address_space_limit(libc::RLIM_INFINITY);
    let before_allocating = before_allocating.expect("the load reported its allocating stage");
    let (unit, device, message) = load_error(match result {
        Ok(_) => panic!("loaded past the address-space limit"),
        Err(e) => e,
    });
    assert_eq!(
        (unit.as_str(), device.as_str(), message.as_str()),
        (
            "layers.1",
            "host",
            "cannot allocate 122.07 MiB of host memory"
        )
    );
    // Layer 0's cache and the weights are unmapped again (buffers this large are mapped on
    // their own, and unmapped when freed).
    assert!(
        after_failure < before_allocating + 16 * MIB,
        "{} MiB mapped before allocating, {} MiB after the failure",
        before_allocating / MIB,
        after_failure / MIB
    );
    // The same process loads again, in the room the first load was planned with plus one
    // layer's cache: it would not fit had the failed load kept anything.
    set_address_space_limit(before_allocating + (192 + 256) * MIB);
    let loaded = load(fixture("models/tiny-llama"), &options, &mut |_| {});
    set_address_space_limit(libc::RLIM_INFINITY);
    let loaded = loaded.unwrap();
    assert_eq!(loaded.report.verified_tensors, Some(loaded.tensors.len()));
    assert_eq!(loaded.caches.len(), 3);
    assert!(loaded.caches.iter().all(|c| c.buffer.len() == 128_000_000));
}
