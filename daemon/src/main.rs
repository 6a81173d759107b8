fn main() {
    eprintln!("dbqsfs: nothing is implemented yet");
    std::process::exit(2);
}
