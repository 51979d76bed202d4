//! Prints a GGUF file's metadata and tensor table: `cargo run --example gguf_dump -- FILE`.
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: gguf_dump FILE.gguf");
        std::process::exit(2);
    };
    match arbor_runtime::gguf::GgufFile::open(path.as_ref()) {
        Ok(f) => {
            println!(
                "GGUF v{}, {} tensors, data at {}",
                f.header.version,
                f.header.tensors.len(),
                f.header.data_offset
            );
            for (k, v) in &f.header.metadata {
                println!("{k} = {v}");
            }
            for t in &f.header.tensors {
                println!("{} {:?} {} {} bytes", t.name, t.dims, t.ty, t.nbytes);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
