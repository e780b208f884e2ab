//! Ctrl-C for the whole process: the first press asks the work in progress to stop at its next
//! safe point (training after the current optimiser step, saving the adapter; an eval after the
//! current batch, its samples already on disk; a study after the current cell), a second press
//! exits at once. One handler serves every command, so a study that trains and then evaluates
//! in one process stops the same way in either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without a handler (another one already set) Ctrl-C keeps its default: exit at once,
        // which a run folder and a training checkpoint also survive.
        let _ = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: stopping at the next safe point (what is finished is kept); Ctrl-C again quits at once"
            );
        });
    });
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
