//! The `arbor` command line.
fn main() {
    println!("arbor");
}
