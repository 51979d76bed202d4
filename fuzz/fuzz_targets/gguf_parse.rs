//! Any bytes given to the GGUF parser, and a parsed header given to the tokenizer and
//! config readers, must give a value or an error, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = arbor_runtime::gguf::parse(data) {
        let _ = arbor_runtime::Tokenizer::from_gguf_header(&header);
    }
});
