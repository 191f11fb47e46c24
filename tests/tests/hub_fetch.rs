//! Hub ids everywhere, against the loopback Hub server (tests/src/hub_server.rs): header-only
//! `inspect` and `plan` (a 70B-shaped repository planned with under 16 MB read), downloads into
//! the Hugging Face cache that Python's huggingface_hub finds offline and the other way round,
//! a download resumed after a dropped connection, a corrupted body refetched or refused, and
//! the errors a user meets (no such repo or revision, gated, offline and not cached).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use weightsmith_tests::hub_server::{BodyFault, HubServer, StoredFile, Transfer};
use weightsmith_tests::{fixture, llama_shaped_files, weightsmith_bin, LlamaShape};

const TOKEN: &str = "hf_test_token_for_fetch";

/// `weightsmith ARGS` with the Hub at `server`, the cache at `cache`, and extra variables.
fn run(server: &HubServer, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(weightsmith_bin());
    cmd.args(args)
        .env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", cache.join("no-home"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run weightsmith")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A folder's top-level files as repository files (safetensors through LFS).
fn files_of(dir: &Path) -> Vec<(String, StoredFile)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let lfs = name.ends_with(".safetensors");
            out.push((name, StoredFile::new(std::fs::read(&p).unwrap(), lfs)));
        }
    }
    out
}

/// `merge --base org/tiny-llama --adapter org/tiny-lora --out OUT` and `extra`.
fn merge_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "merge",
        "--base",
        "org/tiny-llama",
        "--adapter",
        "org/tiny-lora",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

fn server_with_tiny_llama() -> HubServer {
    let server = HubServer::start(TOKEN, Transfer::Basic);
    server.put_repo(
        "org/tiny-llama",
        files_of(&fixture("models/tiny-llama")),
        false,
    );
    server.put_repo(
        "org/tiny-lora",
        files_of(&fixture("adapters/llama-lora/adapter")),
        false,
    );
    server
}

fn python_hub() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("WEIGHTSMITH_REQUIRE_PYTHON").is_some() {
        panic!("WEIGHTSMITH_REQUIRE_PYTHON=1 but python3 cannot import huggingface_hub");
    }
    ok
}

fn python(server: &HubServer, cache: &Path, code: &str) -> Output {
    Command::new("python3")
        .args(["-c", code])
        .env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_TOKEN")
        .env("HF_HOME", cache.join("no-home"))
        .output()
        .expect("run python3")
}

/// A Llama-3-70B-shaped repository (80 layers, 141 GB of BF16) whose shards are sparse.
fn seventy_b(server: &HubServer) -> u64 {
    let (files, total) = llama_shaped_files(&LlamaShape::LLAMA_3_70B, 30);
    server.put_repo("meta/llama-70b-shaped", files, false);
    total
}

#[test]
fn plans_a_70b_shaped_repo_from_its_headers_under_16_mb() {
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let weights = seventy_b(&server);
    let cache = tempfile::tempdir().unwrap();
    let o = run(
        &server,
        cache.path(),
        &[
            "plan",
            "meta/llama-70b-shaped",
            "--devices",
            "80GiB,80GiB",
            "--json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["model"], "meta/llama-70b-shaped");
    let read = server.bytes_sent();
    assert!(read < 16_000_000, "planning read {read} bytes");
    assert!(weights > 140_000_000_000, "{weights}");
    let inspect = run(
        &server,
        cache.path(),
        &["inspect", "meta/llama-70b-shaped", "--json"],
        &[],
    );
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect));
    let r: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(r["path"], "meta/llama-70b-shaped");
    eprintln!(
        "plan of a {:.1} GB repository read {read} bytes",
        weights as f64 / 1e9
    );
    // Nothing was put in the cache: headers go to a temporary folder, removed after.
    assert!(!cache.path().join("models--meta--llama-70b-shaped").exists());
}

#[test]
fn merges_from_the_hub_into_the_cache_that_python_reads() {
    let server = server_with_tiny_llama();
    // As on the Hub, LFS files are a 302 to another location (the CDN).
    server.redirect_lfs(true);
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("merged");
    let o = run(
        &server,
        cache.path(),
        &merge_args(&out, &["--device", "cpu", "--json"]),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The same bytes as a merge of the local fixtures.
    let local = work.path().join("local");
    let l = weightsmith_tests::weightsmith(&[
        "merge",
        "--base",
        fixture("models/tiny-llama").to_str().unwrap(),
        "--adapter",
        fixture("adapters/llama-lora/adapter").to_str().unwrap(),
        "--out",
        local.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(l.status.code(), Some(0), "{}", text(&l));
    let (a, b) = (
        st_io::Checkpoint::open(&out).unwrap(),
        st_io::Checkpoint::open(&local).unwrap(),
    );
    for t in b.tensors() {
        assert!(
            a.tensor_bytes(a.tensor(&t.name).unwrap()) == b.tensor_bytes(t),
            "{}",
            t.name
        );
    }
    // The card names the base's Hub id.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: \"org/tiny-llama\""), "{card}");
    // The cache is huggingface_hub's: blobs, snapshots linked to them, refs/main.
    let repo = cache.path().join("models--org--tiny-llama");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    let snap = repo.join("snapshots").join(commit.trim());
    assert!(std::fs::read_link(snap.join("model-00001-of-00003.safetensors")).is_ok());
    assert!(!snap.join("README.md").exists() || snap.join("config.json").exists());
    if python_hub() {
        let p = python(
            &server,
            cache.path(),
            "from huggingface_hub import hf_hub_download\nimport hashlib\nfor f in ['config.json','model.safetensors.index.json','model-00001-of-00003.safetensors','model-00003-of-00003.safetensors']:\n    p = hf_hub_download('org/tiny-llama', f, local_files_only=True)\n    print(f, hashlib.sha256(open(p,'rb').read()).hexdigest()[:12])\np = hf_hub_download('org/tiny-lora', 'adapter_model.safetensors', local_files_only=True)\nprint('adapter ok')",
        );
        assert!(p.status.success(), "{}", text(&p));
    }
    // publish --base-model sets base_model in the card the merge wrote, keeping the rest.
    let o = run(
        &server,
        cache.path(),
        &[
            "publish",
            out.to_str().unwrap(),
            "--repo",
            "org/merged",
            "--dry-run",
            "--json",
            "--base-model",
            "other/base",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let published = v["card"].as_str().unwrap();
    assert!(
        published.contains("base_model: \"other/base\"")
            && !published.contains("org/tiny-llama\"\n"),
        "{published}"
    );
    assert!(
        published.contains("base_model_relation: merge"),
        "{published}"
    );
    // A second merge downloads nothing: every file is in the cache.
    server.clear_log();
    let again = work.path().join("again");
    let o = run(
        &server,
        cache.path(),
        &merge_args(&again, &["--device", "cpu"]),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        !server.log().iter().any(|l| l.path.contains("/resolve/")),
        "{:?}",
        server.log()
    );
}

#[test]
fn uses_what_python_downloaded_offline_with_no_request() {
    if !python_hub() {
        eprintln!("skipped: python3 with huggingface_hub not found");
        return;
    }
    let server = server_with_tiny_llama();
    server.redirect_lfs(true);
    let cache = tempfile::tempdir().unwrap();
    let p = python(
        &server,
        cache.path(),
        "from huggingface_hub import snapshot_download, get_safetensors_metadata\nsnapshot_download('org/tiny-llama')\nsnapshot_download('org/tiny-lora')\nm = get_safetensors_metadata('org/tiny-llama')\nprint(sorted(m.files_metadata))",
    );
    assert!(
        p.status.success(),
        "the server must serve huggingface_hub: {}",
        text(&p)
    );
    assert!(String::from_utf8_lossy(&p.stdout).contains("model-00003-of-00003.safetensors"));
    server.clear_log();
    let work = tempfile::tempdir().unwrap();
    let offline = [("HF_HUB_OFFLINE", "1")];
    for args in [
        vec!["inspect", "org/tiny-llama"],
        vec!["plan", "org/tiny-llama", "--devices", "1GiB"],
        vec!["load", "org/tiny-llama"],
    ] {
        let o = run(&server, cache.path(), &args, &offline);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
    }
    let out = work.path().join("m");
    let o = run(
        &server,
        cache.path(),
        &merge_args(&out, &["--device", "cpu"]),
        &offline,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        server.log().is_empty(),
        "requests sent offline: {:?}",
        server.log()
    );
}

#[test]
fn a_dropped_download_resumes_and_a_corrupted_one_is_refetched_or_refused() {
    let server = server_with_tiny_llama();
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    server.body_fault("model-00002-of-00003", BodyFault::DropAfter(5000), 1);
    server.body_fault("model-00003-of-00003", BodyFault::Corrupt, 1);
    let o = run(
        &server,
        cache.path(),
        &["load", "org/tiny-llama", "--verify"],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let gets = |f: &str| {
        server
            .log()
            .iter()
            .filter(|l| l.method == "GET" && l.path.ends_with(f))
            .count()
    };
    assert_eq!(gets("model-00002-of-00003.safetensors"), 2, "resumed once");
    assert_eq!(
        gets("model-00003-of-00003.safetensors"),
        2,
        "refetched once"
    );
    let blobs = cache.path().join("models--org--tiny-llama/blobs");
    for e in std::fs::read_dir(&blobs).unwrap() {
        let p = e.unwrap().path();
        assert!(
            !p.to_string_lossy().ends_with(".incomplete"),
            "{}",
            p.display()
        );
    }
    // Corrupted twice: refused, and nothing of it in the snapshot.
    let server = server_with_tiny_llama();
    let cache = tempfile::tempdir().unwrap();
    server.body_fault("model-00001-of-00003", BodyFault::Corrupt, 2);
    let out = work.path().join("m");
    let o = run(&server, cache.path(), &merge_args(&out, &[]), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("model-00001-of-00003.safetensors") && text(&o).contains("refused"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
    let snaps = cache.path().join("models--org--tiny-llama/snapshots");
    let linked: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .map(|d| {
            d.flatten()
                .flat_map(|s| {
                    std::fs::read_dir(s.path())
                        .unwrap()
                        .flatten()
                        .map(|e| e.path())
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(
        linked
            .iter()
            .all(|p| !p.ends_with("model-00001-of-00003.safetensors")),
        "{linked:?}"
    );
}

#[test]
fn errors_name_the_repo_and_what_to_do() {
    let server = server_with_tiny_llama();
    server.put_repo("org/gated", files_of(&fixture("models/tiny-mistral")), true);
    let cache = tempfile::tempdir().unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["inspect", "org/missing"],
            vec![],
            "no repository org/missing",
        ),
        (
            vec!["inspect", "org/tiny-llama@nope"],
            vec![],
            "has no revision \"nope\"",
        ),
        (
            vec!["inspect", "org/gated"],
            vec![],
            "org/gated is gated: accept its license at",
        ),
        (vec!["load", "org/gated"], vec![], "accept its license"),
        (
            vec!["inspect", "org/tiny-llama"],
            vec![("HF_HUB_OFFLINE", "1")],
            "HF_HUB_OFFLINE is set",
        ),
    ];
    for (args, env, expect) in cases {
        let o = run(&server, cache.path(), &args, &env);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(expect), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains(TOKEN));
    }
    // With the token, the gated repository opens.
    let o = run(
        &server,
        cache.path(),
        &["inspect", "org/gated"],
        &[("HF_TOKEN", TOKEN)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("MistralForCausalLM"));
}

#[test]
fn a_local_path_of_the_same_name_wins() {
    let server = server_with_tiny_llama();
    let cache = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cwd.path().join("org")).unwrap();
    weightsmith_tests::copy_fixture("models/tiny-mistral", &cwd.path().join("org"));
    std::fs::rename(
        cwd.path().join("org/tiny-mistral"),
        cwd.path().join("org/tiny-llama"),
    )
    .unwrap();
    let o = Command::new(weightsmith_bin())
        .args(["inspect", "org/tiny-llama"])
        .current_dir(cwd.path())
        .env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("MistralForCausalLM"), "{}", text(&o));
    assert!(server.log().is_empty());
}
