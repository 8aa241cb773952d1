//! Repository passwords from the user's side: weak ones refused at `init`,
//! the environment read as bytes like a password file, key files kept private.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

use common::{Env, stderr};

#[test]
fn a_blank_or_short_password_is_refused_at_init_and_nothing_is_created() {
    let env = Env::new();
    for weak in [" ", "   \t", "short"] {
        let o = env
            .cmd()
            .env("FERRY_PASSWORD", weak)
            .arg("init")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{weak:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("nothing was created"), "{}", stderr(&o));
        assert!(!env.repo.join("config").exists());
    }
}

#[test]
fn a_password_that_is_not_utf8_works_from_the_environment_as_from_a_file() {
    let env = Env::new();
    let password = b"caf\xe9 au lait \xff";
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", OsStr::from_bytes(password))
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let file = env.path("pw");
    std::fs::write(&file, [&password[..], b"\n"].concat()).unwrap();
    let o = env
        .cmd()
        .env_remove("FERRY_PASSWORD")
        .args(["points", "--password-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", OsStr::from_bytes(password))
        .arg("points")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // The key file and the config are readable by their owner only.
    for entry in std::fs::read_dir(env.repo.join("keys")).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mode = std::fs::metadata(env.repo.join("config"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
