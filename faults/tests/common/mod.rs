//! What the fault test binaries share.

use std::path::PathBuf;

/// The `concord` binary built beside this test binary (a test build has its fail points, see
/// `concord-node`'s `failpoints` feature).
pub fn concord_bin() -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/concord
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("concord");
    assert!(
        bin.exists(),
        "{} missing: build it first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        bin.display()
    );
    bin
}
