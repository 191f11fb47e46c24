//! Faults a long job meets on a shared machine (issue #23): a merge, a download from the Hub and
//! a publish, each killed with SIGKILL at 20 evenly spread moments of its run. Afterwards the
//! output is absent or complete and byte-identical to an uninterrupted run (for a download: no
//! blob in the cache that is not its hash's content; for a publish: the repository holds the
//! folder's last commit or nothing), the inputs are unchanged, and the next run succeeds and
//! leaves no temporary file behind. Then a write refused part-way (a full disk).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use weightsmith_tests::hub_server::{HubServer, StoredFile, Transfer};
use weightsmith_tests::{
    bf16_header, entries, llama_shaped_files, sha256_hex, weightsmith_bin, LlamaShape,
};

const SHAPE: LlamaShape = LlamaShape {
    layers: 2,
    hidden: 512,
    intermediate: 1408,
    vocab: 16000,
    heads: 8,
    kv_heads: 2,
};

/// A Llama-shaped base (sparse zeros, 40 MB in 2 shards) and an r=8 LoRA on q_proj and v_proj.
fn make_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let (files, _) = llama_shaped_files(&SHAPE, 2);
    for (name, stored) in files {
        let path = base.join(&name);
        std::fs::write(&path, &stored.content).unwrap();
        if let Some(len) = stored.sparse_len {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
    }
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let (h, kv, r) = (
        SHAPE.hidden,
        SHAPE.kv_heads * (SHAPE.hidden / SHAPE.heads),
        8u64,
    );
    let mut tensors = Vec::new();
    for i in 0..SHAPE.layers {
        for (m, out) in [("q_proj", h), ("v_proj", kv)] {
            let p = format!("base_model.model.model.layers.{i}.self_attn.{m}");
            tensors.push((format!("{p}.lora_A.weight"), vec![r, h]));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, r]));
        }
    }
    let (mut bytes, len) = bf16_header(&tensors);
    // Values 2^-7 and -2^-6 alternating (BF16 0x3C00, 0xBC80): a non-zero delta everywhere.
    while (bytes.len() as u64) < len {
        bytes.extend_from_slice(if bytes.len() % 4 == 0 {
            &[0x00, 0x3C]
        } else {
            &[0x80, 0xBC]
        });
    }
    std::fs::write(adapter.join("adapter_model.safetensors"), bytes).unwrap();
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false, "task_type": "CAUSAL_LM"});
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    (base, adapter)
}

/// Every file below `dir` (relative name → SHA-256).
fn digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for (k, v) in digest(&p) {
                out.insert(
                    format!("{}/{k}", p.file_name().unwrap().to_string_lossy()),
                    v,
                );
            }
        } else {
            out.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha256_hex(&std::fs::read(&p).unwrap()),
            );
        }
    }
    out
}

fn merge_command(base: &Path, adapter: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(weightsmith_bin());
    cmd.args([
        "merge",
        "--device",
        "cpu",
        "--force",
        "--max-shard-size",
        "15MB",
        "--base",
    ])
    .arg(base)
    .arg("--adapter")
    .arg(adapter)
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

#[test]
fn a_merge_killed_at_any_of_20_moments_leaves_nothing_wrong() {
    let work = tempfile::tempdir().unwrap();
    let (base, adapter) = make_inputs(work.path());
    let inputs = (digest(&base), digest(&adapter));
    // The uninterrupted run: the reference bytes and the run's length.
    let reference_dir = work.path().join("reference");
    std::fs::create_dir(&reference_dir).unwrap();
    let started = Instant::now();
    let status = merge_command(&base, &adapter, &reference_dir.join("out"))
        .status()
        .unwrap();
    assert!(status.success());
    let run = started.elapsed();
    let reference = digest(&reference_dir.join("out"));
    assert!(reference.len() >= 4, "{reference:?}");

    let points = 20;
    let (mut absent, mut complete) = (0, 0);
    for k in 1..=points {
        let parent = work.path().join(format!("round{k}"));
        std::fs::create_dir(&parent).unwrap();
        let out = parent.join("out");
        let mut child = merge_command(&base, &adapter, &out).spawn().unwrap();
        std::thread::sleep(run.mul_f64(k as f64 / (points + 1) as f64));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The output is absent, or complete and the uninterrupted run's bytes.
        if out.exists() {
            assert_eq!(
                digest(&out),
                reference,
                "moment {k}: a present output differs"
            );
            complete += 1;
        } else {
            absent += 1;
        }
        assert_eq!(
            (digest(&base), digest(&adapter)),
            inputs,
            "moment {k}: an input changed"
        );
        // The next run succeeds, gives the same bytes, and leaves only the output.
        let status = merge_command(&base, &adapter, &out).status().unwrap();
        assert!(
            status.success(),
            "moment {k}: the run after the kill failed"
        );
        assert_eq!(digest(&out), reference, "moment {k}");
        assert_eq!(entries(&parent), ["out"], "moment {k}: left behind");
        std::fs::remove_dir_all(&parent).unwrap();
    }
    eprintln!("killed at {points} moments of a {run:?} merge: {absent} left no output, {complete} a complete one; none left a temporary folder after the next run");
    assert!(absent > 0, "no kill landed before the output was in place");
}

/// A write that the system refuses part-way (a full disk, or here the file-size limit of
/// `ulimit -f`, which fails writes past 5 MB with EFBIG as a full disk fails them with ENOSPC):
/// exit 1, an error naming the file being written, nothing left behind, inputs unchanged.
#[test]
fn a_write_refused_part_way_is_an_error_naming_the_file_and_leaves_nothing() {
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    let (base, adapter) = make_inputs(work.path());
    let inputs = (digest(&base), digest(&adapter));
    let parent = work.path().join("outs");
    std::fs::create_dir(&parent).unwrap();
    let mut cmd = merge_command(&base, &adapter, &parent.join("out"));
    cmd.stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 5 << 20,
                rlim_max: 5 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            // Without this, the kernel ends the process with SIGXFSZ instead of failing the write.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let shard = parent.join("out/model-00001-of-00003.safetensors");
    assert!(
        err.contains(&format!("{}: writing ", shard.display())),
        "the error names the file: {err}"
    );
    assert!(err.contains("the shard needs"), "and the bytes: {err}");
    assert!(
        entries(&parent).is_empty(),
        "left behind: {:?}",
        entries(&parent)
    );
    assert_eq!((digest(&base), digest(&adapter)), inputs);
}

const TOKEN: &str = "hf_faultsToken";

/// The files of `dir` as a Hub repository holds them (safetensors through LFS).
fn stored(dir: &Path) -> Vec<(String, StoredFile)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let lfs = name.ends_with(".safetensors");
        out.push((name, StoredFile::new(std::fs::read(&p).unwrap(), lfs)));
    }
    out
}

/// A git blob id (how the Hub names a small file's blob).
fn git_oid(b: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

/// Every blob of a Hugging Face cache folder is whole (its content hashes to its name, or it
/// is an `.incomplete` a later run resumes), and every snapshot entry links to a whole blob.
/// Returns the number of `.incomplete` files.
fn check_cache(repo_cache: &Path, moment: usize) -> usize {
    let mut incomplete = 0;
    let blobs = repo_cache.join("blobs");
    for e in std::fs::read_dir(&blobs).into_iter().flatten() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".incomplete") {
            incomplete += 1;
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            sha256_hex(&bytes) == name || git_oid(&bytes) == name,
            "moment {moment}: blob {name} is not whole ({} bytes)",
            bytes.len()
        );
    }
    for snap in std::fs::read_dir(repo_cache.join("snapshots"))
        .into_iter()
        .flatten()
    {
        for e in std::fs::read_dir(snap.unwrap().path()).unwrap() {
            let p = e.unwrap().path();
            let target = std::fs::canonicalize(&p)
                .unwrap_or_else(|_| panic!("moment {moment}: {} dangles", p.display()));
            assert!(target.starts_with(std::fs::canonicalize(&blobs).unwrap()));
        }
    }
    incomplete
}

#[test]
fn a_download_killed_at_any_of_20_moments_leaves_no_wrong_blob_and_resumes() {
    let work = tempfile::tempdir().unwrap();
    let (base, _) = make_inputs(work.path());
    let server = HubServer::start(TOKEN, Transfer::Basic);
    server.put_repo("org/base", stored(&base), false);
    // A slow link (16 MB/s per connection): the 40 MB download lasts about a second, so the
    // kills land in the transfers, not only in what follows them.
    server.throttle(Some(16_000_000));
    // `load` on this machine's devices (host memory on CI): the download, then a load that
    // reads every byte back (--verify).
    let hub_load = |cache: &Path| {
        let mut cmd = Command::new(weightsmith_bin());
        cmd.args(["load", "org/base", "--verify"])
            .env("HF_ENDPOINT", &server.endpoint)
            .env("HF_HUB_CACHE", cache)
            .env("HF_HOME", cache.join("no-home"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let started = Instant::now();
    assert!(hub_load(&work.path().join("reference-cache"))
        .status()
        .unwrap()
        .success());
    let run = started.elapsed();
    let whole = stored(&base).iter().map(|(_, f)| f.len()).sum::<u64>();

    let points = 20;
    let (mut partial, mut resumed) = (0, 0);
    for k in 1..=points {
        let cache = work.path().join(format!("cache{k}"));
        let mut child = hub_load(&cache).spawn().unwrap();
        std::thread::sleep(run.mul_f64(k as f64 / (points + 1) as f64));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let repo_cache = cache.join("models--org--base");
        let left = check_cache(&repo_cache, k);
        partial += usize::from(left > 0);
        // The next run resumes what is there, succeeds, and leaves the cache whole.
        let before = server.bytes_sent();
        let status = hub_load(&cache).status().unwrap();
        assert!(
            status.success(),
            "moment {k}: the run after the kill failed"
        );
        resumed += usize::from(server.bytes_sent() - before < whole);
        assert_eq!(
            check_cache(&repo_cache, k),
            0,
            "moment {k}: an .incomplete left"
        );
        assert_eq!(
            digest(&repo_cache.join("snapshots")).len(),
            stored(&base).len(),
            "moment {k}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }
    eprintln!("download killed at {points} moments of a {run:?} run: {partial} left an .incomplete, {resumed} next runs fetched less than the whole repository; no wrong blob, no dangling link, every next run complete");
    assert!(partial > 0, "no kill landed during a transfer");
}

#[test]
fn a_publish_killed_at_any_of_20_moments_leaves_the_folder_and_completes_on_rerun() {
    let work = tempfile::tempdir().unwrap();
    let (base, adapter) = make_inputs(work.path());
    let folder = work.path().join("merged");
    assert!(merge_command(&base, &adapter, &folder)
        .status()
        .unwrap()
        .success());
    let files = digest(&folder);
    // A new Hub per run (one that already holds the LFS objects would skip the uploads),
    // on a slow link (32 MB/s): the kills land in the uploads too.
    let hub = || {
        let server = HubServer::start(TOKEN, Transfer::Basic);
        server.throttle(Some(32_000_000));
        server
    };
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let publish = |server: &HubServer, repo: &str| {
        let mut cmd = Command::new(weightsmith_bin());
        cmd.arg("publish")
            .arg(&folder)
            .args([
                "--repo",
                repo,
                "--endpoint",
                &server.endpoint,
                "--token",
                TOKEN,
            ])
            .env_remove("HF_TOKEN")
            .env("HOME", &home)
            .env("WEIGHTSMITH_RETRY_BASE_MS", "5")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let server = hub();
    let started = Instant::now();
    assert!(publish(&server, "me/x").status().unwrap().success());
    let run = started.elapsed();
    // The repository's files by hash; its README.md (the card names the repository) by
    // whether it names `repo`.
    let repo_files = |server: &HubServer, repo: &str| -> Option<BTreeMap<String, String>> {
        let r = server.repo(repo)?;
        let main = r.branches.get("main")?;
        Some(
            main.files
                .iter()
                .map(|(name, f)| {
                    let id = if name == "README.md" {
                        let card = String::from_utf8_lossy(&f.content);
                        format!("names its repository: {}", card.contains(repo))
                    } else {
                        sha256_hex(&f.content)
                    };
                    (name.clone(), id)
                })
                .collect(),
        )
    };
    let reference = repo_files(&server, "me/x").unwrap();
    // The Hub copy is the folder, file for file (README.md gets the repository's id; the
    // Hub adds .gitattributes to a new repository).
    assert_eq!(
        reference
            .keys()
            .filter(|n| *n != ".gitattributes")
            .collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>()
    );
    for (name, hash) in files.iter().filter(|(n, _)| *n != "README.md") {
        assert_eq!(reference.get(name), Some(hash), "{name}");
    }

    let points = 20;
    let (mut nothing, mut committed) = (0, 0);
    for k in 1..=points {
        let (server, repo) = (hub(), "me/x");
        let mut child = publish(&server, repo).spawn().unwrap();
        std::thread::sleep(run.mul_f64(k as f64 / (points + 1) as f64));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // One commit or none: the repository has every file of the folder, or no commit.
        match repo_files(&server, repo) {
            Some(f) if !f.is_empty() && f.len() > 1 => {
                assert_eq!(f, reference, "moment {k}: a partial commit");
                committed += 1;
            }
            _ => nothing += 1,
        }
        assert_eq!(digest(&folder), files, "moment {k}: the folder changed");
        let status = publish(&server, repo).status().unwrap();
        assert!(
            status.success(),
            "moment {k}: the publish after the kill failed"
        );
        assert_eq!(repo_files(&server, repo).unwrap(), reference, "moment {k}");
        assert_eq!(digest(&folder), files, "moment {k}: the folder changed");
    }
    eprintln!("publish killed at {points} moments of a {run:?} run: {nothing} before the commit, {committed} after it; every re-run completed the repository, the folder never changed");
    assert!(nothing > 0, "no kill landed before the commit");
}
