//! The streaming sharded writer: round trips, transformers' splitting rule, atomicity.

use proptest::prelude::*;
use st_io::writer::{plan_shards, DEFAULT_MAX_SHARD_BYTES};
use st_io::{Checkpoint, Dtype, Error, LayoutKind, ShardWriter, TensorSpec, WriterOptions};

fn options(max: u64) -> WriterOptions {
    WriterOptions {
        max_shard_bytes: max,
        ..WriterOptions::default()
    }
}

fn bytes_for(spec: &TensorSpec, seed: u8) -> Vec<u8> {
    (0..spec.bytes().unwrap())
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// An independent statement of huggingface_hub's rule, shard by shard, as sizes.
fn expected_split(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0;
    for (i, &s) in sizes.iter().enumerate() {
        if s > max {
            shards.push(vec![i]);
        } else {
            if current_size + s > max {
                shards.push(std::mem::take(&mut current));
                current_size = 0;
            }
            current.push(i);
            current_size += s;
        }
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

#[test]
fn splits_like_transformers_and_names_files_like_it() {
    // huggingface_hub's docstring example: [6, 6, 2, 6, 2, 2] GB at 10 GB → [6], [6+2], [6+2+2].
    let gb = 1_000_000_000u64;
    let specs: Vec<TensorSpec> = [6, 6, 2, 6, 2, 2]
        .iter()
        .enumerate()
        .map(|(i, s)| TensorSpec::new(format!("t{i}"), Dtype::U8, vec![s * gb]))
        .collect();
    let plan = plan_shards(&specs, 10 * gb).unwrap();
    let groups: Vec<Vec<usize>> = plan.shards.iter().map(|s| s.tensors.clone()).collect();
    assert_eq!(groups, vec![vec![0], vec![1, 2], vec![3, 4, 5]]);
    assert_eq!(plan.shards[2].file_name, "model-00003-of-00003.safetensors");
    assert_eq!(plan.total_bytes, 24 * gb);
    // A tensor over the limit gets its own shard, placed before the shard still being filled.
    let specs: Vec<TensorSpec> = [1, 12, 1]
        .iter()
        .enumerate()
        .map(|(i, s)| TensorSpec::new(format!("t{i}"), Dtype::U8, vec![s * gb]))
        .collect();
    let groups: Vec<Vec<usize>> = plan_shards(&specs, 10 * gb)
        .unwrap()
        .shards
        .iter()
        .map(|s| s.tensors.clone())
        .collect();
    assert_eq!(groups, vec![vec![1], vec![0, 2]]);
    // Default is 5 GB; a small model is one model.safetensors.
    assert_eq!(DEFAULT_MAX_SHARD_BYTES, 5_000_000_000);
    let one = plan_shards(&specs[..1], DEFAULT_MAX_SHARD_BYTES).unwrap();
    assert_eq!(one.shards[0].file_name, "model.safetensors");
}

#[test]
fn writes_interleaved_shards_sequentially_and_reads_back() {
    // The oversized tensor in the middle goes to shard 1 while shard 2 is being filled.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let specs = vec![
        TensorSpec::new("a", Dtype::F32, vec![4]),
        TensorSpec::new("big", Dtype::BF16, vec![40]),
        TensorSpec::new("c", Dtype::F16, vec![2, 3]),
    ];
    let mut w = ShardWriter::create(&dest, specs.clone(), options(32)).unwrap();
    for (i, s) in specs.iter().enumerate() {
        w.write_tensor(&s.name, &bytes_for(s, i as u8)).unwrap();
    }
    w.add_file("config.json", b"{}").unwrap();
    let summary = w.finish().unwrap();
    let names: Vec<&str> = summary.files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json"
        ]
    );
    let c = Checkpoint::open(&dest).unwrap();
    assert_eq!(c.kind(), LayoutKind::Sharded);
    for (i, s) in specs.iter().enumerate() {
        let t = c.tensor(&s.name).unwrap();
        assert_eq!((t.dtype, &t.shape), (s.dtype, &s.shape));
        assert_eq!(c.tensor_bytes(t), bytes_for(s, i as u8));
    }
    assert_eq!(
        c.files()[0].metadata,
        Some(vec![("format".into(), "pt".into())])
    );
    // Headers are padded so the data area starts on an 8-byte boundary.
    for f in c.files() {
        assert_eq!((8 + f.header_len) % 8, 0);
    }
    let index = std::fs::read_to_string(dest.join("model.safetensors.index.json")).unwrap();
    assert!(index.starts_with("{\n  \"metadata\": {\n    \"total_size\": 108\n  },\n  \"weight_map\": {\n    \"a\": \"model-00002-of-00002.safetensors\""), "{index}");
    assert!(index.ends_with("}\n"));
    // Nothing else is left beside the destination.
    let siblings: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("out")]);
}

#[test]
fn refuses_an_existing_destination_unless_told_to_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep.txt"), b"mine").unwrap();
    let specs = vec![TensorSpec::new("a", Dtype::U8, vec![3])];
    let e = ShardWriter::create(&dest, specs.clone(), options(100))
        .err()
        .unwrap();
    assert!(matches!(e, Error::DestinationExists { .. }), "{e}");
    assert!(e
        .to_string()
        .ends_with("already exists; choose another destination or allow replacing it"));
    assert_eq!(std::fs::read(dest.join("keep.txt")).unwrap(), b"mine");
    let mut w = ShardWriter::create(
        &dest,
        specs,
        WriterOptions {
            replace_existing: true,
            ..options(100)
        },
    )
    .unwrap();
    w.write_tensor("a", &[1, 2, 3]).unwrap();
    w.finish().unwrap();
    assert!(!dest.join("keep.txt").exists());
    assert!(dest.join("model.safetensors").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn an_unfinished_or_failed_write_leaves_nothing_that_looks_done() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let specs = vec![
        TensorSpec::new("a", Dtype::U8, vec![3]),
        TensorSpec::new("b", Dtype::U8, vec![2]),
    ];
    {
        let mut w = ShardWriter::create(&dest, specs.clone(), options(100)).unwrap();
        w.write_tensor("a", &[1, 2, 3]).unwrap();
        // Dropped without finish (an error or Ctrl-C in the caller).
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let mut w = ShardWriter::create(&dest, specs.clone(), options(100)).unwrap();
    w.write_tensor("a", &[1, 2, 3]).unwrap();
    let e = w.finish().unwrap_err();
    assert_eq!(
        e.to_string(),
        "writer: finish called with 1 tensor(s) unwritten, starting with \"b\""
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn refuses_at_once_a_checkpoint_larger_than_the_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    // An exabyte: more than any test machine's disk.
    let exabyte = 1_000_000_000_000_000_000u64;
    let specs = vec![TensorSpec::new("huge", Dtype::U8, vec![exabyte])];
    let Err(e) = ShardWriter::create(&dest, specs, options(DEFAULT_MAX_SHARD_BYTES)) else {
        panic!("an exabyte checkpoint was accepted");
    };
    let Error::NoSpace {
        path,
        needed,
        available,
        ..
    } = &e
    else {
        panic!("expected NoSpace, got {e}");
    };
    assert_eq!(path, dir.path());
    assert_eq!(*needed, exabyte);
    assert!(*available < exabyte);
    let message = e.to_string();
    assert!(
        message.starts_with(&format!(
            "{}: not enough free space: the checkpoint needs 1000.00 PB, the file system has ",
            dir.path().display()
        )),
        "{message}"
    );
    // Nothing is left behind: no destination, no temporary folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn rejects_misuse_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![
        TensorSpec::new("a", Dtype::F32, vec![2]),
        TensorSpec::new("b", Dtype::U8, vec![1]),
    ];
    let mut w = ShardWriter::create(dir.path().join("o"), specs.clone(), options(100)).unwrap();
    let e = w.write_tensor("b", &[0]).unwrap_err().to_string();
    assert_eq!(
        e,
        "writer: tensor \"b\" was given but \"a\" comes next in the declared order"
    );
    let e = w.write_tensor("a", &[0; 7]).unwrap_err().to_string();
    assert_eq!(
        e,
        "writer: tensor \"a\" was given 7 bytes but shape [2] of F32 needs 8"
    );
    let mut w = ShardWriter::create(dir.path().join("o"), specs.clone(), options(100)).unwrap();
    let e = w.write_tensor("a", &[0; 9]).unwrap_err().to_string();
    assert!(e.contains("was given 9 bytes"), "{e}");
    let mut w = ShardWriter::create(dir.path().join("o"), specs.clone(), options(100)).unwrap();
    let e = w
        .write_tensor_with("a", |_sink| {
            Err::<(), _>(std::io::Error::other("disk on fire"))
        })
        .unwrap_err()
        .to_string();
    assert_eq!(e, "writer: tensor \"a\": disk on fire");
    let dup = vec![
        TensorSpec::new("a", Dtype::U8, vec![1]),
        TensorSpec::new("a", Dtype::U8, vec![1]),
    ];
    let e = ShardWriter::create(dir.path().join("o"), dup, options(100))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "writer: tensor \"a\" is declared twice");
    let mut w = ShardWriter::create(dir.path().join("o"), specs, options(100)).unwrap();
    assert!(w.add_file("../x", b"").is_err());
    assert!(w.add_file("model.safetensors", b"").is_err());
    let e = ShardWriter::create(dir.path().join("o"), vec![], options(0))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("more than 0 bytes"), "{e}");
}

#[test]
fn streams_a_tensor_through_the_sink_in_pieces() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("o");
    let spec = TensorSpec::new("w", Dtype::BF16, vec![1000]);
    let mut w = ShardWriter::create(&dest, vec![spec], options(1 << 20)).unwrap();
    w.write_tensor_with("w", |sink| {
        for chunk in 0..10u8 {
            sink.write_all(&[chunk; 200])?;
        }
        Ok::<(), std::io::Error>(())
    })
    .unwrap();
    w.finish().unwrap();
    let c = Checkpoint::open(&dest).unwrap();
    let bytes = c.tensor_bytes(c.tensor("w").unwrap());
    assert_eq!(bytes[0], 0);
    assert_eq!(bytes[1999], 9);
}

fn spec_strategy() -> impl Strategy<Value = Vec<TensorSpec>> {
    let dtype = prop::sample::select(vec![
        Dtype::BOOL,
        Dtype::U8,
        Dtype::F8_E4M3,
        Dtype::BF16,
        Dtype::F16,
        Dtype::F32,
        Dtype::I64,
        Dtype::F64,
    ]);
    prop::collection::vec((dtype, prop::collection::vec(0u64..9, 0..3)), 0..12).prop_map(|ts| {
        ts.into_iter()
            .enumerate()
            .map(|(i, (d, shape))| TensorSpec::new(format!("model.layers.{i}.w"), d, shape))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random tensors written at a random shard size read back identical, with each tensor
    /// in the shard the rule says.
    #[test]
    fn round_trips_with_splits_where_they_belong(specs in spec_strategy(), max in 1u64..200) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let mut w = ShardWriter::create(&dest, specs.clone(), options(max)).unwrap();
        for (i, s) in specs.iter().enumerate() {
            w.write_tensor(&s.name, &bytes_for(s, i as u8)).unwrap();
        }
        w.finish().unwrap();
        let c = Checkpoint::open(&dest).unwrap();
        prop_assert_eq!(c.tensors().len(), specs.len());
        let sizes: Vec<u64> = specs.iter().map(|s| s.bytes().unwrap()).collect();
        let expected = expected_split(&sizes, max);
        prop_assert_eq!(c.files().len(), expected.len());
        for (shard, members) in expected.iter().enumerate() {
            for &i in members {
                let t = c.tensor(&specs[i].name).unwrap();
                prop_assert_eq!(t.file, shard);
                prop_assert_eq!(c.tensor_bytes(t), &bytes_for(&specs[i], i as u8)[..]);
                prop_assert_eq!(&t.shape, &specs[i].shape);
                prop_assert_eq!(t.dtype, specs[i].dtype);
            }
        }
    }
}

/// A small tmpfs of our own, unmounted on drop.
#[cfg(target_os = "linux")]
struct SmallFs(std::path::PathBuf);

#[cfg(target_os = "linux")]
impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB (needs root, as on CI); WEIGHTSMITH_NO_MOUNT=1 says the
    /// machine cannot, and the test then says so and checks nothing.
    fn mount(at: &std::path::Path, mib: u64) -> Option<SmallFs> {
        if std::env::var_os("WEIGHTSMITH_NO_MOUNT").is_some() {
            eprintln!("WEIGHTSMITH_NO_MOUNT: the small file system test is not run");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root; set WEIGHTSMITH_NO_MOUNT=1 where it cannot be done"
        );
        Some(SmallFs(at.to_path_buf()))
    }
}

#[cfg(target_os = "linux")]
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(target_os = "linux")]
#[test]
fn force_counts_the_replaced_folder_as_free_space() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&dir.path().join("fs"), 8) else {
        return;
    };
    let dest = fs.0.join("out");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("model.safetensors"), vec![7u8; 5 * MIB as usize]).unwrap();
    let specs = |mib: u64| vec![TensorSpec::new("t", Dtype::U8, vec![mib * MIB])];
    let replacing = WriterOptions {
        replace_existing: true,
        ..options(DEFAULT_MAX_SHARD_BYTES)
    };
    // 10 MiB do not fit even once the 5 MiB folder is gone: refused, the old folder intact.
    let Err(e) = ShardWriter::create(&dest, specs(10), replacing.clone()) else {
        panic!("10 MiB fitted in an 8 MiB file system");
    };
    assert!(e.to_string().contains("of the folder it replaces"), "{e}");
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap().len() as u64,
        5 * MIB
    );
    // 6 MiB fit only in the room the replaced folder frees (3 MiB are free beside it).
    let mut w = ShardWriter::create(&dest, specs(6), replacing).unwrap();
    assert!(w.replaced_early());
    w.write_tensor("t", &vec![1u8; 6 * MIB as usize]).unwrap();
    w.finish().unwrap();
    let c = st_io::Checkpoint::open(&dest).unwrap();
    assert_eq!(c.tensors()[0].len, 6 * MIB);
    // Nothing else is left in the file system.
    let names: Vec<_> = std::fs::read_dir(&fs.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out"]);
}

/// A killed run's temporary folder for the same destination is removed (its bytes free again)
/// and reported; one of a process that still runs, and other names, are left alone.
#[cfg(target_os = "linux")]
#[test]
fn removes_the_leftovers_of_dead_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    // A process that ran and is gone, and one that still runs.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let mut alive = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let dead_tmp = dir.path().join(format!(".out.weightsmith-tmp-{gone_pid}"));
    let live_tmp = dir
        .path()
        .join(format!(".out.weightsmith-tmp-{}", alive.id()));
    let other = dir
        .path()
        .join(format!(".other.weightsmith-tmp-{gone_pid}"));
    for d in [&dead_tmp, &live_tmp, &other] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(
            d.join("model-00001-of-00002.safetensors"),
            vec![0u8; 100_000],
        )
        .unwrap();
    }
    let w = ShardWriter::create(
        &dest,
        vec![TensorSpec::new("a", Dtype::U8, vec![4])],
        options(100),
    )
    .unwrap();
    let removed = w.removed_leftovers().to_vec();
    drop(w);
    let _ = alive.kill();
    let _ = alive.wait();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].0, dead_tmp);
    assert!(removed[0].1 >= 100_000);
    assert!(!dead_tmp.exists());
    assert!(live_tmp.exists(), "a running process's folder was removed");
    assert!(other.exists(), "another destination's folder was removed");
}
