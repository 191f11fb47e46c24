//! The commands in README.md and docs/ are true: every `weightsmith` command of an `sh` block
//! runs on the shipped fixtures with exit 0 (in a scratch folder, so outputs land there), and
//! every script, bench, package and repository path the pages name exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use weightsmith_tests::{repo_root, weightsmith_bin};

fn pages() -> Vec<PathBuf> {
    let root = repo_root();
    let mut pages = vec![root.join("README.md"), root.join("scripts/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The commands of a page's `sh` blocks, continuation lines joined, comments dropped.
fn sh_commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        if let Some(lang) = line.strip_prefix("```") {
            in_sh = !in_sh && lang.trim() == "sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
            continue;
        }
        pending.push_str(line.trim());
        if !pending.is_empty() && !pending.starts_with('#') {
            out.push(std::mem::take(&mut pending));
        }
        pending.clear();
    }
    out
}

fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_string).collect()
}

#[test]
fn every_page_has_its_commands_and_the_readme_its_two() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let commands = sh_commands(&readme);
    assert!(
        commands.iter().any(|c| c.starts_with(
            "cargo run --release -p weightsmith -- merge --base fixtures/models/tiny-llama"
        )),
        "{commands:?}"
    );
    assert!(
        commands.iter().any(|c| c == "cargo test --workspace"),
        "{commands:?}"
    );
    assert!(
        readme.lines().count() < 150,
        "README.md is the front page: keep it short"
    );
}

#[test]
fn every_weightsmith_command_in_the_docs_runs_on_the_fixtures() {
    let scratch = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        repo_root().join("fixtures"),
        scratch.path().join("fixtures"),
    )
    .unwrap();
    let bin_dir = weightsmith_bin().parent().unwrap().to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut ran = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for command in sh_commands(&text) {
            let Some(rest) = command
                .strip_prefix("cargo run --release -p weightsmith -- ")
                .or_else(|| command.strip_prefix("weightsmith "))
            else {
                continue;
            };
            // Outputs of earlier pages (the README's merge) may be made again by a later one.
            let force = if rest.starts_with("merge ") && !rest.contains("--force") {
                " --force"
            } else {
                ""
            };
            // Run by the shell, as a reader would paste it, with our binary as `weightsmith`.
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!("weightsmith {rest}{force}"))
                .env("PATH", path.clone())
                .current_dir(scratch.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: `{command}` failed:\n{}",
                page.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} commands found");
}

#[test]
fn every_script_bench_package_and_path_the_docs_name_exists() {
    let root = repo_root();
    let benches: BTreeSet<String> = std::fs::read_dir(root.join("benches/benches"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .collect();
    let manifests = [
        "crates/st-io",
        "crates/planner",
        "crates/gpu-mem",
        "crates/lora-kernels",
        "crates/hub-publish",
        "crates/weightsmith",
        "crates/weightsmith-py",
        "tests",
        "benches",
        "xtask",
    ];
    let packages: BTreeSet<String> = manifests
        .iter()
        .map(|m| {
            let text = std::fs::read_to_string(root.join(m).join("Cargo.toml")).unwrap();
            let line = text.lines().find(|l| l.starts_with("name = ")).unwrap();
            line.trim_start_matches("name = ")
                .trim_matches('"')
                .to_string()
        })
        .collect();
    let path_like = regex::Regex::new(r"(?:^|[\s`(\[])((?:scripts|crates|tests|kernels|fixtures|benches|docs|xtask)/[A-Za-z0-9_./{}*<>-]*[A-Za-z0-9_])").unwrap();
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let shown = page
            .strip_prefix(&root)
            .unwrap_or(&page)
            .display()
            .to_string();
        for line in sh_commands(&text) {
            for command in line
                .split("&&")
                .map(str::trim)
                .filter(|c| c.starts_with("cargo "))
            {
                let w = words(command);
                if let Some(i) = w.iter().position(|x| x == "--bench") {
                    if !w.get(i + 1).is_some_and(|b| benches.contains(b)) {
                        problems.push(format!("{shown}: `{command}`: no such bench"));
                    }
                }
                for (i, x) in w.iter().enumerate() {
                    if x == "-p" && !w.get(i + 1).is_some_and(|p| packages.contains(p)) {
                        problems.push(format!("{shown}: `{command}`: no such package"));
                    }
                }
            }
        }
        for m in path_like.captures_iter(&text) {
            let path = &m[1];
            if path.contains(['{', '*', '<'])
                || path.starts_with("fixtures/matrix/") && path.contains("OURS")
            {
                continue;
            }
            if !exists(&root, path, &page) {
                problems.push(format!("{shown}: names {path}, which does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A path as a page names it: from the repository root, or relative to the page.
fn exists(root: &Path, path: &str, page: &Path) -> bool {
    let path = path.trim_end_matches('.');
    root.join(path).exists() || page.parent().is_some_and(|d| d.join(path).exists())
}
