//! The safetensors header parser: never a panic, and it accepts exactly what the `safetensors`
//! crate (the format's reference) accepts, apart from the stricter checks st-io adds
//! (a header must be accepted by the reference to be accepted by us).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = st_io::Header::parse(std::path::Path::new("fuzz.safetensors"), data);
    if ours.is_ok() {
        assert!(
            safetensors::SafeTensors::deserialize(data).is_ok(),
            "st-io accepted a file the safetensors crate refuses"
        );
    }
});
