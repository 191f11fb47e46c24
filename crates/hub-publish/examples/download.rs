//! Downloads every file of a Hub repository into the Hugging Face cache, as `load` and `merge`
//! do for a Hub id, and prints what it transferred (for scripts/device/download-bench.sh).
//!
//!     cargo run --release -p hub-publish --example download -- OWNER/NAME[@REV]
//!
//! The environment says where: HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args()
        .nth(1)
        .ok_or("usage: download OWNER/NAME[@REV]")?;
    let id = hub_publish::HubId::parse(&arg).ok_or("not a Hub id: OWNER/NAME[@REV]")?;
    let opts = hub_publish::FetchOptions::from_env();
    let started = std::time::Instant::now();
    let (snapshot, report) = hub_publish::download(&id, &opts, &|_| true, &|_| {})?;
    println!(
        "{} in {:.3} s: {} bytes received in {} requests, {} files from the cache",
        snapshot.display(),
        started.elapsed().as_secs_f64(),
        report.bytes_received,
        report.requests,
        report.cached_files
    );
    Ok(())
}
