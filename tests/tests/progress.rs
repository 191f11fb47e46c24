//! Progress events as a program embedding the library sees them (issue #27): a merge reports
//! every tensor once, in order, with bytes that only grow and end at the total; a load reports
//! each file before its copy, with the bytes done so far, and the end.

use weightsmith::{load, merge, LoadOptions, MergeDevice, MergeOptions};
use weightsmith_tests::fixture;

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
    let model = load(fixture("models/tiny-llama"), &options, &mut |p| {
        events.push((p.file.to_string(), p.bytes_done, p.bytes_total))
    })
    .unwrap();
    let files: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
    // One event per file before its copy, then one with no file when every byte is in place.
    assert_eq!(
        files,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            ""
        ]
    );
    assert_eq!(events[0].1, 0);
    assert!(events.windows(2).all(|w| w[1].1 > w[0].1));
    let total = model.report.weight_bytes;
    assert!(events.iter().all(|e| e.2 == total), "{events:?}");
    assert_eq!(events.last().unwrap().1, total);
}
