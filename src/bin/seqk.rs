//! `seqk`: run, verify and benchmark the seq-kernels kernels from the command line.

fn main() {
    std::process::exit(seq_kernels::cli::main());
}
