//! Progress events as a program embedding the library sees them (issue #27): a merge reports
//! every tensor once, in order, with bytes that only grow and end at the total; a load reports
//! each file before its copy, with the bytes done so far, and the end; a publish hashes, then
//! connects, uploads and commits, in that order, with counts that end at its report's.

use std::sync::Mutex;

use weightsmith::hub_publish::Event;
use weightsmith::{
    load, merge, publish, LoadOptions, LoadStage, MergeDevice, MergeOptions, PublishOptions,
};
use weightsmith_tests::fixture;
use weightsmith_tests::hub_server::{HubServer, Transfer};

#[test]
fn merge_progress_counts_every_tensor_and_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = MergeOptions::new(
        vec![(fixture("adapters/llama-lora/adapter"), 1.0)],
        dir.path().join("out"),
    );
    options.device = MergeDevice::Cpu;
    let mut events: Vec<(String, usize, usize, u64, u64)> = Vec::new();
    let report = merge(fixture("models/tiny-llama"), &options, &mut |p| {
        events.push((
            p.tensor.to_string(),
            p.tensors_done,
            p.tensors_total,
            p.bytes_done,
            p.bytes_total,
        ))
    })
    .unwrap();
    assert!(!events.is_empty());
    let total_tensors = report.tensors_written;
    let total_bytes = events[0].4;
    assert_eq!(total_bytes, report.tensor_bytes);
    for w in events.windows(2) {
        assert!(
            w[1].1 >= w[0].1 && w[1].3 >= w[0].3,
            "progress went back: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    for e in &events {
        assert_eq!((e.2, e.4), (total_tensors, total_bytes), "{e:?}");
        assert!(e.1 <= total_tensors && e.3 <= total_bytes, "{e:?}");
    }
    let last = events.last().unwrap();
    assert_eq!(
        (last.1, last.3),
        (total_tensors, total_bytes),
        "the last event is the end"
    );
}

#[test]
fn load_progress_names_each_file_before_its_copy() {
    let options = LoadOptions {
        host_only: true,
        ..LoadOptions::default()
    };
    let mut events: Vec<(String, u64, u64)> = Vec::new();
    let mut stages: Vec<LoadStage> = Vec::new();
    let mut allocating_units = String::new();
    let model = load(fixture("models/tiny-llama"), &options, &mut |p| {
        if p.stage == LoadStage::Allocating {
            allocating_units = p.units.to_string();
        }
        stages.push(p.stage);
        events.push((p.file.to_string(), p.bytes_done, p.bytes_total))
    })
    .unwrap();
    let files: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
    // One event once the plan is made, before any buffer is allocated, naming every unit and
    // its device; one per file before its copy; one with no file when every byte is in place.
    assert_eq!(
        stages,
        [
            LoadStage::Allocating,
            LoadStage::Copying,
            LoadStage::Copying,
            LoadStage::Copying,
            LoadStage::Copied
        ]
    );
    assert_eq!(
        files,
        [
            "",
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            ""
        ]
    );
    assert_eq!(allocating_units, "embedding, layers.0-2, norm, head → host");
    assert_eq!((events[0].1, events[1].1), (0, 0));
    assert!(events[1..].windows(2).all(|w| w[1].1 > w[0].1));
    let total = model.report.weight_bytes;
    assert!(events.iter().all(|e| e.2 == total), "{events:?}");
    assert_eq!(events.last().unwrap().1, total);
}

#[test]
fn publish_progress_hashes_connects_uploads_and_commits_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("out");
    let mut options = MergeOptions::new(
        vec![(fixture("adapters/llama-lora/adapter"), 1.0)],
        folder.clone(),
    );
    options.device = MergeDevice::Cpu;
    options.max_shard_bytes = 100_000;
    merge(fixture("models/tiny-llama"), &options, &mut |_| {}).unwrap();
    let server = HubServer::start("hf_progressToken", Transfer::Basic);
    let options = PublishOptions::new(
        "me/progress",
        Some("hf_progressToken"),
        Some(&server.endpoint),
    );
    let run = || {
        let events = Mutex::new(Vec::new());
        let summary = publish(&folder, &options, &|e| events.lock().unwrap().push(e)).unwrap();
        (summary, events.into_inner().unwrap())
    };
    let (summary, events) = run();
    let report = summary.report.as_ref().unwrap();
    // The phases in order: hashing, connecting, uploading, committing (each phase's events
    // together, never going back to an earlier phase).
    let phase = |e: &Event| match e {
        Event::Hashing { .. } => 0,
        Event::Connecting { .. } => 1,
        Event::Uploading { .. } => 2,
        Event::Committing => 3,
    };
    let phases: Vec<u8> = events.iter().map(phase).collect();
    assert!(phases.windows(2).all(|w| w[0] <= w[1]), "{events:?}");
    assert_eq!(phases.iter().filter(|&&p| p == 3).count(), 1, "{events:?}");
    assert!(events.contains(&Event::Connecting {
        endpoint: server.endpoint.clone()
    }));
    // Hashing counts every byte of the folder's files once, growing to their total (the card,
    // README.md, is written in memory and hashed there).
    let hashed: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Hashing {
                done_bytes,
                total_bytes,
            } => Some((*done_bytes, *total_bytes)),
            _ => None,
        })
        .collect();
    assert!(hashed.windows(2).all(|w| w[0].0 <= w[1].0), "{hashed:?}");
    let on_disk: u64 = summary
        .files
        .iter()
        .filter(|f| f.path != "README.md")
        .map(|f| f.bytes)
        .sum();
    assert_eq!(hashed.last(), Some(&(on_disk, on_disk)));
    // Uploading grows to the LFS bytes (the shards), all of them sent; the small files go
    // inside the commit.
    let sent: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Uploading {
                sent_bytes,
                total_bytes,
            } => Some((*sent_bytes, *total_bytes)),
            _ => None,
        })
        .collect();
    assert!(sent.windows(2).all(|w| w[0].0 <= w[1].0), "{sent:?}");
    let last = sent.last().expect("upload events");
    let shards: u64 = summary
        .files
        .iter()
        .filter(|f| f.path.ends_with(".safetensors"))
        .map(|f| f.bytes)
        .sum();
    assert_eq!(*last, (shards, shards), "{sent:?}");
    assert!(
        report.bytes_sent > 0 && last.0 <= report.bytes_sent,
        "{sent:?} {report:?}"
    );
    // A second publish of the same folder sends nothing and commits nothing.
    let (summary, events) = run();
    assert!(summary.report.unwrap().commit_oid.is_none());
    assert!(!events.contains(&Event::Committing), "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Uploading { sent_bytes, .. } if *sent_bytes > 0)),
        "{events:?}"
    );
}
