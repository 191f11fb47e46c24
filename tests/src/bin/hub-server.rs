//! The loopback Hub-compatible server of the tests as a program, for benchmarks and manual
//! tries: `hub-server [--token T] [--multipart CHUNK_BYTES]` prints its endpoint on the first
//! line of stdout and serves until stdin closes (or it is killed).

use weightsmith_tests::hub_server::{HubServer, Transfer};

fn main() {
    let mut token = "hf_local".to_string();
    let mut transfer = Transfer::Basic;
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
            other => {
                eprintln!("hub-server: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let server = HubServer::start(&token, transfer);
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
    eprintln!("hub-server: {} requests, {bytes} request bytes", log.len());
}
