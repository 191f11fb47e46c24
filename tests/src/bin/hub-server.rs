//! The loopback Hub-compatible server of the tests as a program, for benchmarks and manual
//! tries: `hub-server [--token T] [--multipart CHUNK_BYTES] [--serve OWNER/NAME=DIR]
//! [--llama-shaped OWNER/NAME=70b|405b]` prints its endpoint on the first line of stdout and
//! serves until stdin closes (or it is killed). `--serve` holds a folder's files as a
//! repository (in memory); `--llama-shaped` a header-only Llama-3-70B or 405B-shaped one.

use weightsmith_tests::hub_server::{HubServer, StoredFile, Transfer};
use weightsmith_tests::{llama_shaped_files, LlamaShape};

fn main() {
    let mut token = "hf_local".to_string();
    let mut transfer = Transfer::Basic;
    let mut repos: Vec<(String, Vec<(String, StoredFile)>)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--token" => token = args.next().expect("--token VALUE"),
            "--multipart" => {
                let chunk = args
                    .next()
                    .and_then(|c| c.parse().ok())
                    .expect("--multipart CHUNK_BYTES");
                transfer = Transfer::Multipart(chunk);
            }
            "--serve" => {
                let spec = args.next().expect("--serve OWNER/NAME=DIR");
                let (id, dir) = spec.split_once('=').expect("--serve OWNER/NAME=DIR");
                let mut files = Vec::new();
                for e in std::fs::read_dir(dir).expect("read the folder") {
                    let p = e.expect("read the folder").path();
                    if p.is_file() {
                        let name = p
                            .file_name()
                            .expect("a name")
                            .to_string_lossy()
                            .into_owned();
                        let lfs = name.ends_with(".safetensors");
                        files.push((name, StoredFile::new(std::fs::read(&p).expect("read"), lfs)));
                    }
                }
                repos.push((id.to_string(), files));
            }
            "--llama-shaped" => {
                let spec = args.next().expect("--llama-shaped OWNER/NAME=70b|405b");
                let (id, size) = spec
                    .split_once('=')
                    .expect("--llama-shaped OWNER/NAME=70b|405b");
                let (shape, shards) = match size {
                    "70b" => (LlamaShape::LLAMA_3_70B, 30),
                    "405b" => (LlamaShape::LLAMA_3_405B, 191),
                    other => panic!("--llama-shaped: {other} is not 70b or 405b"),
                };
                repos.push((id.to_string(), llama_shaped_files(&shape, shards).0));
            }
            other => {
                eprintln!("hub-server: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let server = HubServer::start(&token, transfer);
    for (id, files) in repos {
        server.put_repo(&id, files, false);
    }
    println!("{}", server.endpoint);
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        sink.clear();
    }
    let log = server.log();
    let bytes: usize = log.iter().map(|l| l.body_len).sum();
    eprintln!(
        "hub-server: {} requests, {bytes} request bytes, {} response bytes",
        log.len(),
        server.bytes_sent()
    );
}
