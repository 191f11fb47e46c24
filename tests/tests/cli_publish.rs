//! `weightsmith publish` and `merge --push-to` against a Hub-compatible server on loopback
//! (`weightsmith_tests::hub_server`): a folder arrives complete, a re-run sends nothing, an
//! interrupted run resumes, and every failure — bad input, 401, 403, 404, 5xx, no server —
//! gives a clear error, exit ≠ 0 and no token in the output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use weightsmith_tests::hub_server::{HubServer, Transfer};
use weightsmith_tests::{fixture, sha256_hex, weightsmith_bin};

const TOKEN: &str = "hf_testTokenThatMustNeverBePrinted";

/// Runs the CLI with a clean Hub environment (no HF_TOKEN, a HOME without a token file).
fn ws(args: &[&str], home: &Path) -> (i32, String, String) {
    let out: Output = Command::new(weightsmith_bin())
        .args(args)
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home)
        .env("WEIGHTSMITH_RETRY_BASE_MS", "5")
        .output()
        .expect("run weightsmith");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A merged tiny Llama in `tmp/merged` (shards of 120 kB so there are several).
fn merged(tmp: &Path) -> PathBuf {
    let out = tmp.join("merged");
    let (code, _, err) = ws(
        &[
            "merge",
            "--base",
            &s(&fixture("models/tiny-llama")),
            "--adapter",
            &s(&fixture("adapters/llama-lora/adapter")),
            "--out",
            &s(&out),
            "--max-shard-size",
            "120kB",
        ],
        tmp,
    );
    assert_eq!(code, 0, "{err}");
    out
}

fn publish_args<'a>(dir: &'a str, repo: &'a str, endpoint: &'a str) -> Vec<&'a str> {
    vec![
        "publish",
        dir,
        "--repo",
        repo,
        "--endpoint",
        endpoint,
        "--token",
        TOKEN,
    ]
}

/// Every file of `folder` is in the branch with the same bytes (README.md may have the repo
/// id put in); .safetensors went through LFS.
fn assert_arrived(server: &HubServer, repo: &str, branch: &str, folder: &Path) {
    let r = server.repo(repo).expect("repo created");
    let b = r.branches.get(branch).expect("branch");
    let mut count = 0;
    for entry in std::fs::read_dir(folder).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let local = std::fs::read(entry.path()).unwrap();
        let remote = b
            .files
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        if name == "README.md" {
            let want = String::from_utf8(local)
                .unwrap()
                .replace("PATH_OR_REPO", repo);
            assert_eq!(String::from_utf8(remote.content.clone()).unwrap(), want);
        } else {
            assert_eq!(
                sha256_hex(&remote.content),
                sha256_hex(&local),
                "{name} differs"
            );
        }
        assert_eq!(remote.lfs, name.ends_with(".safetensors"), "{name}");
        count += 1;
    }
    assert!(count >= 7, "only {count} files");
}

fn count(server: &HubServer, method: &str, path: &str) -> usize {
    server
        .log()
        .iter()
        .filter(|l| l.method == method && l.path.contains(path))
        .count()
}

fn no_token_in(out: &str, err: &str) {
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN), "token leaked");
    assert!(!out.contains("TokenThatMust") && !err.contains("TokenThatMust"));
}

#[test]
fn a_published_folder_arrives_complete_and_a_rerun_sends_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let before: Vec<(String, String)> = snapshot(&dir);
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let d = s(&dir);
    let (code, out, err) = ws(
        &publish_args(&d, "me/tiny-merged", &server.endpoint),
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    no_token_in(&out, &err);
    assert!(out.contains("published"), "{out}");
    assert!(out.contains("basic transfer"), "{out}");
    assert_arrived(&server, "me/tiny-merged", "main", &dir);
    let repo = server.repo("me/tiny-merged").unwrap();
    assert_eq!(
        repo.commit_messages.len(),
        2,
        "one commit on top of the initial one"
    );
    // The card names the repository, and every request to the API carried the token.
    let card = &repo.branches["main"].files["README.md"].content;
    assert!(String::from_utf8_lossy(card).contains("from_pretrained(\"me/tiny-merged\")"));
    for l in server.log() {
        if l.path.starts_with("/api/") {
            assert_eq!(
                l.authorization.as_deref(),
                Some(format!("Bearer {TOKEN}").as_str())
            );
        } else if l.path.starts_with("/_lfs/") {
            // Presigned upload URLs must not get the token (S3 refuses a second auth).
            assert_eq!(l.authorization, None, "{}", l.path);
        }
    }

    server.clear_log();
    let (code, out, err) = ws(
        &publish_args(&d, "me/tiny-merged", &server.endpoint),
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing uploaded"), "{out}");
    assert_eq!(count(&server, "PUT", "/"), 0);
    assert_eq!(count(&server, "POST", "/commit/"), 0);
    assert_eq!(
        server.repo("me/tiny-merged").unwrap().commit_messages.len(),
        2
    );

    // A changed file goes up again, alone.
    std::fs::write(
        dir.join("generation_config.json"),
        "{\"do_sample\": false}\n",
    )
    .unwrap();
    server.clear_log();
    let (code, out, err) = ws(
        &publish_args(&d, "me/tiny-merged", &server.endpoint),
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published 1 file(s)"), "{out}");
    assert_eq!(
        count(&server, "PUT", "/"),
        0,
        "a small JSON file goes inline"
    );
    assert_arrived(&server, "me/tiny-merged", "main", &dir);
    // Publishing never changes the folder (beyond the edit made above).
    let after = snapshot(&dir);
    assert_eq!(before.len(), after.len());
}

fn snapshot(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                sha256_hex(&std::fs::read(e.path()).unwrap()),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn multipart_uploads_survive_transient_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let server = HubServer::start(TOKEN, Transfer::Multipart(32 * 1024));
    server.fail("PUT", "/_lfs_part/", 503, 2);
    server.fail("POST", "/preupload/", 502, 1);
    let d = s(&dir);
    let (code, out, err) = ws(&publish_args(&d, "me/parts", &server.endpoint), tmp.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("multipart transfer"), "{out}");
    assert_arrived(&server, "me/parts", "main", &dir);
    assert!(
        count(&server, "PUT", "/_lfs_part/") >= 6,
        "several parts per shard"
    );
    assert!(count(&server, "POST", "/_lfs_complete/") >= 2);
}

#[test]
fn an_interrupted_publish_resumes_without_sending_the_weights_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let server = HubServer::start(TOKEN, Transfer::Basic);
    server.fail("POST", "/commit/", 503, 3);
    let d = s(&dir);
    let mut args = publish_args(&d, "me/resume", &server.endpoint);
    args.extend(["--retries", "3"]);
    let (code, out, err) = ws(&args, tmp.path());
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("server error 503 after 3 attempt(s)"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    no_token_in(&out, &err);
    let shards_sent = count(&server, "PUT", "/_lfs/");
    assert!(shards_sent >= 2);
    assert_eq!(
        server.repo("me/resume").unwrap().commit_messages.len(),
        1,
        "nothing committed"
    );

    server.clear_log();
    let (code, out, err) = ws(&args, tmp.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&server, "PUT", "/_lfs/"), 0, "weights not sent again");
    assert!(out.contains("already on the server"), "{out}");
    assert_arrived(&server, "me/resume", "main", &dir);
}

#[test]
fn branches_and_pull_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let d = s(&dir);
    let mut args = publish_args(&d, "org/model", &server.endpoint);
    args.extend(["--revision", "dev", "--commit-message", "first cut"]);
    let (code, _, err) = ws(&args, tmp.path());
    assert_eq!(code, 0, "{err}");
    let repo = server.repo("org/model").unwrap();
    assert_eq!(repo.branches["main"].files.len(), 1, "main untouched");
    assert_arrived(&server, "org/model", "dev", &dir);
    assert_eq!(repo.commit_messages.last().unwrap(), "first cut");

    let mut args = publish_args(&d, "org/model", &server.endpoint);
    args.push("--create-pr");
    let (code, out, err) = ws(&args, tmp.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pull request: "), "{out}");
    assert_arrived(&server, "org/model", "refs/pr/1", &dir);
    assert_eq!(
        server.repo("org/model").unwrap().branches["main"]
            .files
            .len(),
        1
    );
}

#[test]
fn http_failures_are_clear_and_never_show_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let d = s(&dir);
    let server = HubServer::start(TOKEN, Transfer::Basic);

    // 401: a wrong token.
    let bad = "hf_wrongTokenAlsoSecret";
    let (code, out, err) = ws(
        &[
            "publish",
            &d,
            "--repo",
            "me/x",
            "--endpoint",
            &server.endpoint,
            "--token",
            bad,
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("rejected the token (401"), "{err}");
    assert!(!err.contains(bad) && !out.contains(bad), "{err}");

    // 403: a token without write access.
    server.add_read_only_token("hf_readOnlyToken");
    let (code, _, err) = ws(
        &[
            "publish",
            &d,
            "--repo",
            "me/x",
            "--endpoint",
            &server.endpoint,
            "--token",
            "hf_readOnlyToken",
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("not allowed to write to me/x (403"), "{err}");
    assert!(!err.contains("hf_readOnlyToken"), "{err}");

    // 404 from the API.
    server.fail("POST", "/api/repos/create", 404, 1);
    let (code, out, err) = ws(&publish_args(&d, "me/x", &server.endpoint), tmp.path());
    assert_ne!(code, 0);
    assert!(err.contains("404"), "{err}");
    no_token_in(&out, &err);

    // 5xx on every try: retried, then a clear failure.
    server.fail("POST", "/paths-info/", 500, 100);
    server.clear_log();
    let mut args = publish_args(&d, "me/x", &server.endpoint);
    args.extend(["--retries", "4"]);
    let (code, out, err) = ws(&args, tmp.path());
    assert_ne!(code, 0);
    assert!(err.contains("server error 500 after 4 attempt(s)"), "{err}");
    assert_eq!(count(&server, "POST", "/paths-info/"), 4);
    no_token_in(&out, &err);
    drop(server);

    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut args = publish_args(&d, "me/x", &endpoint);
    args.extend(["--retries", "2"]);
    let (code, out, err) = ws(&args, tmp.path());
    assert_ne!(code, 0);
    assert!(err.contains(&format!("cannot reach {endpoint}")), "{err}");
    no_token_in(&out, &err);

    // No token anywhere.
    let (code, _, err) = ws(
        &["publish", &d, "--repo", "me/x", "--endpoint", &endpoint],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("no Hugging Face token"), "{err}");
}

#[test]
fn the_token_comes_from_the_environment_or_the_token_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let d = s(&dir);
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let token_dir = tmp.path().join(".cache/huggingface");
    std::fs::create_dir_all(&token_dir).unwrap();
    std::fs::write(token_dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let (code, out, err) = ws(
        &[
            "publish",
            &d,
            "--repo",
            "me/filetoken",
            "--endpoint",
            &server.endpoint,
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    no_token_in(&out, &err);
    assert_arrived(&server, "me/filetoken", "main", &dir);
}

#[test]
fn bad_folders_are_refused_before_any_byte_goes_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let copy = |name: &str| {
        let c = tmp.path().join(name);
        std::fs::create_dir_all(&c).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), c.join(e.file_name())).unwrap();
        }
        c
    };
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();

    let c = copy("no-config");
    std::fs::remove_file(c.join("config.json")).unwrap();
    cases.push((c, "no config.json"));

    let c = copy("no-weights");
    for e in std::fs::read_dir(&c).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    cases.push((c, "no weights"));

    let c = copy("stray-shard");
    std::fs::copy(
        c.join("model-00001-of-00003.safetensors"),
        c.join("model-00009-of-00009.safetensors"),
    )
    .ok();
    let first = std::fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("model-0000") && n.ends_with(".safetensors"))
        .unwrap();
    std::fs::copy(c.join(&first), c.join("model-extra.safetensors")).unwrap();
    cases.push((c, "not part of the checkpoint"));

    let c = copy("broken-index");
    let idx = c.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    std::fs::write(
        &idx,
        text.replacen("model.embed_tokens.weight", "model.embed_tokens.weigh", 1),
    )
    .unwrap();
    cases.push((c, "index"));

    let c = copy("with-adapter");
    std::fs::copy(
        fixture("adapters/llama-lora/adapter/adapter_config.json"),
        c.join("adapter_config.json"),
    )
    .unwrap();
    cases.push((c, "PEFT adapter files"));

    let c = copy("symlink");
    std::os::unix::fs::symlink("/etc/passwd", c.join("passwd")).unwrap();
    cases.push((c, "symbolic link"));

    let c = copy("too-big");
    std::fs::File::create(c.join("huge.bin"))
        .unwrap()
        .set_len(50_000_000_001)
        .unwrap();
    cases.push((c, "over the Hub's limit"));

    for (folder, expect) in cases {
        let f = s(&folder);
        let (code, out, err) = ws(&publish_args(&f, "me/bad", &server.endpoint), tmp.path());
        assert_ne!(code, 0, "{f}: {out}");
        assert!(err.contains(expect), "{f}: expected {expect:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        server.log().is_empty(),
        "nothing was sent: {:?}",
        server.log()
    );

    let (code, _, err) = ws(
        &publish_args(&s(&dir), "not a repo", &server.endpoint),
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("is not a repository id"), "{err}");
}

#[test]
fn dry_run_shows_files_and_card_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let base = s(&fixture("models/tiny-llama"));
    // A port nobody listens on: a dry run must not try it.
    let (code, out, err) = ws(
        &[
            "publish",
            &base,
            "--repo",
            "me/tiny",
            "--endpoint",
            "http://127.0.0.1:9",
            "--dry-run",
            "--license",
            "apache-2.0",
            "--base-model",
            "meta-llama/Llama-3.2-1B",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing was sent"), "{out}");
    assert!(out.contains("model-00001-of-00003.safetensors"), "{out}");
    assert!(out.contains("README.md (generated)"), "{out}");
    assert!(
        out.contains("base_model: \"meta-llama/Llama-3.2-1B\""),
        "{out}"
    );
    assert!(out.contains("license: \"apache-2.0\""), "{out}");
    assert!(out.contains("pipeline_tag: text-generation"), "{out}");

    let (code, out, err) = ws(
        &[
            "publish",
            &base,
            "--repo",
            "me/tiny",
            "--endpoint",
            "http://127.0.0.1:9",
            "--dry-run",
            "--json",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dry_run"], true);
    assert!(v["report"].is_null());
    assert_eq!(v["files"].as_array().unwrap().len(), 10);
}

#[test]
fn merge_push_to_publishes_the_merged_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let server = HubServer::start(TOKEN, Transfer::Basic);
    let out_dir = tmp.path().join("merged");
    let (code, out, err) = ws(
        &[
            "merge",
            "--base",
            &s(&fixture("models/tiny-llama")),
            "--adapter",
            &s(&fixture("adapters/llama-lora/adapter")),
            "--out",
            &s(&out_dir),
            "--push-to",
            "me/pushed",
            "--endpoint",
            &server.endpoint,
            "--token",
            TOKEN,
            "--base-model",
            "meta-llama/Llama-3.2-1B",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("merged 1 adapter(s)"), "{out}");
    assert!(out.contains("published"), "{out}");
    assert_arrived(&server, "me/pushed", "main", &out_dir);
    let repo = server.repo("me/pushed").unwrap();
    assert!(repo.commit_messages[1].starts_with("Merge 1 LoRA adapter(s)"));
    let card = String::from_utf8(repo.branches["main"].files["README.md"].content.clone()).unwrap();
    assert!(
        card.contains("base_model: \"meta-llama/Llama-3.2-1B\"\nbase_model_relation: merge\n"),
        "{card}"
    );
    assert!(card.contains("from_pretrained(\"me/pushed\")"), "{card}");

    // Without a token the merge does not even start.
    let (code, _, err) = ws(
        &[
            "merge",
            "--base",
            &s(&fixture("models/tiny-llama")),
            "--adapter",
            &s(&fixture("adapters/llama-lora/adapter")),
            "--out",
            &s(&tmp.path().join("m2")),
            "--push-to",
            "me/pushed",
            "--endpoint",
            &server.endpoint,
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("no Hugging Face token"), "{err}");
    assert!(!tmp.path().join("m2").exists());
}

/// The Python `huggingface_hub` client downloads what we uploaded: the server speaks the
/// protocol the official client expects, and the bytes are ours.
#[test]
fn python_huggingface_hub_downloads_what_we_published() {
    let ok = Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("WEIGHTSMITH_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
            panic!("WEIGHTSMITH_REQUIRE_PYTHON=1 but python3 cannot import huggingface_hub");
        }
        eprintln!("skipped: python3 with huggingface_hub not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = merged(tmp.path());
    let server = HubServer::start(TOKEN, Transfer::Multipart(40_000));
    let d = s(&dir);
    let (code, _, err) = ws(&publish_args(&d, "me/py", &server.endpoint), tmp.path());
    assert_eq!(code, 0, "{err}");
    let dl = tmp.path().join("download");
    let script = r#"
import sys, os
from huggingface_hub import snapshot_download
p = snapshot_download(repo_id=sys.argv[1], endpoint=sys.argv[2], token=sys.argv[3], local_dir=sys.argv[4])
print(p)
"#;
    let out = Command::new("python3")
        .args(["-c", script, "me/py", &server.endpoint, TOKEN, &s(&dl)])
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_HOME", tmp.path().join("hf-home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let got = std::fs::read(dl.join(&name)).unwrap();
        let mut want = std::fs::read(e.path()).unwrap();
        if name == "README.md" {
            want = String::from_utf8(want)
                .unwrap()
                .replace("PATH_OR_REPO", "me/py")
                .into_bytes();
        }
        assert_eq!(sha256_hex(&got), sha256_hex(&want), "{name:?}");
    }
}

/// Ctrl-C during `merge --push-to`'s upload ends the process with 130 at once (it used to
/// print "interrupted" and keep uploading); the merged folder stays complete, so publishing it
/// again resumes. The "Hub" here accepts connections and never answers: the upload hangs.
#[test]
fn ctrl_c_during_the_push_to_upload_stops_it_and_keeps_the_merged_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn); // never answered
        }
    });
    let out_dir = tmp.path().join("merged");
    let mut child = std::process::Command::new(weightsmith_tests::weightsmith_bin())
        .args([
            "merge",
            "--base",
            &s(&fixture("models/tiny-llama")),
            "--adapter",
        ])
        .arg(fixture("adapters/llama-lora/adapter"))
        .arg("--out")
        .arg(&out_dir)
        .args([
            "--push-to",
            "me/pushed",
            "--endpoint",
            &endpoint,
            "--token",
            TOKEN,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The merge is done once its output is in place; the upload is then hanging.
    let started = std::time::Instant::now();
    while !out_dir.join("model.safetensors").exists() {
        assert!(started.elapsed().as_secs() < 60, "the merge did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let waited = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            waited.elapsed().as_secs() < 10,
            "one Ctrl-C did not stop the upload"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("the merged folder is complete"), "{err}");
    let ckpt = st_io::Checkpoint::open(&out_dir).unwrap();
    ckpt.require_complete().unwrap();
}
