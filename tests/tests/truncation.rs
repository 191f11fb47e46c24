//! A checkpoint file truncated by another process while a verb reads it (a trainer saving
//! into the folder we read): an error naming the file, no output, nothing left behind, and
//! never SIGBUS — for a merge, a load and a load's verification (issue #26).

use std::path::PathBuf;

use weightsmith::{load, merge, LoadOptions, MergeDevice, MergeOptions};
use weightsmith_tests::{copy_fixture, entries, fixture};

/// A truncation to 100 bytes of `victim`, made once, from another thread, as another
/// process would.
struct Truncation {
    victim: PathBuf,
    done: bool,
}

impl Truncation {
    fn of(victim: PathBuf) -> Truncation {
        Truncation {
            victim,
            done: false,
        }
    }

    fn once(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let victim = self.victim.clone();
        std::thread::spawn(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .unwrap()
                .set_len(100)
                .unwrap();
        })
        .join()
        .unwrap();
    }
}

#[test]
fn a_shard_truncated_during_a_merge_is_an_error_naming_it_and_leaves_no_output() {
    let work = tempfile::tempdir().unwrap();
    let base = copy_fixture("models/tiny-llama", work.path());
    let victim = base.join("model-00003-of-00003.safetensors");
    let out_parent = work.path().join("outs");
    std::fs::create_dir(&out_parent).unwrap();
    let mut options = MergeOptions::new(
        vec![(fixture("adapters/llama-lora/adapter"), 1.0)],
        out_parent.join("merged"),
    );
    options.device = MergeDevice::Cpu;
    let mut cut = Truncation::of(victim);
    let result = merge(&base, &options, &mut |_| cut.once());
    let e = result
        .expect_err("a truncated base must not merge")
        .to_string();
    assert!(e.contains("model-00003-of-00003.safetensors"), "{e}");
    assert!(cut.done, "the merge reported progress");
    assert!(
        entries(&out_parent).is_empty(),
        "left behind: {:?}",
        entries(&out_parent)
    );
}

#[test]
fn a_shard_truncated_during_a_load_is_an_error_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let base = copy_fixture("models/tiny-llama", work.path());
    let victim = base.join("model-00003-of-00003.safetensors");
    let options = LoadOptions {
        host_only: true,
        ..LoadOptions::default()
    };
    let mut cut = Truncation::of(victim);
    let result = load(&base, &options, &mut |_| cut.once());
    let e = result
        .err()
        .expect("a truncated shard must not load")
        .to_string();
    assert!(e.contains("model-00003-of-00003.safetensors"), "{e}");
}

#[test]
fn a_shard_truncated_before_its_verification_is_an_error_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let base = copy_fixture("models/tiny-llama", work.path());
    // Copied first, truncated while the last file is copied: the verification then reads
    // the first file's mapping past its new end.
    let victim = base.join("model-00001-of-00003.safetensors");
    let options = LoadOptions {
        host_only: true,
        verify: true,
        ..LoadOptions::default()
    };
    let mut cut = Truncation::of(victim);
    let result = load(&base, &options, &mut |p| {
        if p.file.starts_with("model-00003") {
            cut.once();
        }
    });
    assert!(cut.done);
    let e = result
        .err()
        .expect("a truncated shard must fail verification")
        .to_string();
    assert!(e.contains("model-00001-of-00003.safetensors"), "{e}");
    assert!(e.contains("shrank") || e.contains("changed size"), "{e}");
}
