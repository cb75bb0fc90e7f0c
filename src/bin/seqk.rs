//! `seqk`: run, verify and benchmark the seq-kernels kernels from the command line.

fn main() {
    // Rust ignores SIGPIPE, so printing into a pipe that closed early (`seqk verify | head`)
    // would panic; the default action ends the process quietly, as Unix tools do.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid action for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(seq_kernels::cli::main());
}
