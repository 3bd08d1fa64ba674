//! Any text fed to the policy loader yields policies or field errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = breakwater::config::load_policies(text, "fuzz.yaml");
    }
});
