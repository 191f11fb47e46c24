//! `adapter_config.json` as st-io reads it: any bytes give a value or an error naming the file, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("adapter_config.json");
    if let Err(e) = st_io::AdapterConfig::parse(path, data) {
        assert!(
            e.to_string().contains("adapter_config.json"),
            "an error that does not name the file: {e}"
        );
    }
});
