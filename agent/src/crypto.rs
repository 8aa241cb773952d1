//! Keys and authenticated encryption.
//!
//! A repository has one master secret: a 256-bit data key (AES-256-GCM) and a
//! 256-bit id key (keyed BLAKE3 for chunk ids). Each `keys/<id>` object wraps the
//! master secret with a key derived from a password by Argon2id, so a password can
//! be added or changed without touching any data.
//!
//! Every sealed message is `nonce[12] || ciphertext || tag[16]`. Nonces are random;
//! see docs/formats.md for the bound this places on the number of objects per key.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes a sealed message adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + 16;

/// A chunk id: keyed BLAKE3 of the chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The repository's master secret, unwrapped.
pub struct MasterKey {
    data: LessSafeKey,
    id_key: [u8; 32],
    raw: [u8; 64],
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        Self::from_raw(self.raw)
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random master secret.
    pub fn generate() -> Self {
        let mut raw = [0u8; 64];
        fill_random(&mut raw);
        Self::from_raw(raw)
    }

    /// Whether `other` is the same secret (a key file read back, unwrapped).
    pub fn same_secret(&self, other: &MasterKey) -> bool {
        self.raw == other.raw
    }

    fn from_raw(raw: [u8; 64]) -> Self {
        let mut id_key = [0u8; 32];
        id_key.copy_from_slice(&raw[32..]);
        let data = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw[..32]).expect("AES-256 key is 32 bytes"),
        );
        MasterKey { data, id_key, raw }
    }

    /// The id of a chunk with this plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// A keyed hasher (for digests that must not be computable without the key).
    pub fn keyed_hasher(&self, context: &str) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.id_key);
        h.update(context.as_bytes());
        h
    }

    /// Seal `plaintext` into `out` (appended) as `nonce || ciphertext || tag`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        seal_into(&self.data, aad, plaintext, out);
    }

    /// Seal in place: `buf[at..at + NONCE_LEN]` is room for the nonce and
    /// `buf[at + NONCE_LEN..]` the plaintext, which becomes the ciphertext, and
    /// the tag is appended; the same bytes [`Self::seal_into`] would append to
    /// `buf[..at]`, without copying the plaintext there first.
    pub fn seal_in_place(&self, aad: &[u8], buf: &mut Vec<u8>, at: usize) {
        seal_in_place(&self.data, aad, buf, at);
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Open a sealed message; fails when it was altered or sealed with another key.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open(&self.data, aad, sealed)
    }

    /// Open a sealed message held in `buf`, in place; returns the plaintext within it.
    pub fn open_in_place<'a>(&self, aad: &[u8], buf: &'a mut [u8]) -> Option<&'a [u8]> {
        if buf.len() < OVERHEAD {
            return None;
        }
        let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self.data.open_in_place(nonce, Aad::from(aad), rest).ok()?;
        Some(plain)
    }

    /// Wrap the master secret under a password.
    pub fn wrap(&self, password: &[u8], kdf: KdfParams) -> Result<KeyFile> {
        let mut salt = [0u8; 32];
        fill_random(&mut salt);
        let kdf = KdfParams {
            salt: hex::encode(salt),
            ..kdf
        };
        let kek = kdf.derive(password)?;
        let wrapped = kek.seal(KEY_AAD, &self.raw);
        Ok(KeyFile {
            kdf,
            wrapped: hex::encode(wrapped),
            created: chrono::Utc::now(),
            host: hostname(),
        })
    }

    /// Unwrap a key file with a password; `None` when the password does not open it.
    pub fn unwrap(key: &KeyFile, password: &[u8]) -> Result<Option<MasterKey>> {
        let kek = key.kdf.derive(password)?;
        let wrapped = hex::decode(&key.wrapped)
            .map_err(|_| Error::corrupt("key file", "wrapped key is not hex"))?;
        let Some(raw) = kek.open(KEY_AAD, &wrapped) else {
            return Ok(None);
        };
        let raw: [u8; 64] = raw
            .try_into()
            .map_err(|_| Error::corrupt("key file", "wrapped key has the wrong length"))?;
        Ok(Some(MasterKey::from_raw(raw)))
    }
}

const KEY_AAD: &[u8] = b"ferry key v1";

/// Argon2id parameters, stored in every key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub algorithm: String,
    /// Memory in KiB.
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Hex salt (empty until a key is wrapped).
    #[serde(default)]
    pub salt: String,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes and 4 lanes: RFC 9106's second recommended option
    /// (section 4), above OWASP's Argon2id minimum (19 MiB, 2 passes). The
    /// lanes are computed on as many threads as there are cores, so the same
    /// memory and passes cost half the time on two cores, and a guess costs
    /// an attacker the same memory and work. Key files of 1 lane, which
    /// builds before 2026-12-07 wrote, open as before.
    fn default() -> Self {
        KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 4,
            salt: String::new(),
        }
    }
}

struct Kek(LessSafeKey);

impl Kek {
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal_into(&self.0, aad, plaintext, &mut out);
        out
    }
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open(&self.0, aad, sealed)
    }
}

/// The most memory a key file may ask Argon2id for: 4 times what `init` writes.
pub const MAX_KDF_MEMORY_KIB: u32 = 256 * 1024;
/// The most passes a key file may ask for.
pub const MAX_KDF_ITERATIONS: u32 = 8;
/// The most lanes a key file may ask for.
pub const MAX_KDF_PARALLELISM: u32 = 4;
/// The most work (KiB of memory times passes) one key file may cost: 4 times
/// what `init` writes (64 MiB, 3 passes), about a second here. A planted key
/// file therefore costs at most that before the next one is tried.
pub const MAX_KDF_WORK: u64 = 4 * 64 * 1024 * 3;
/// The longest salt a key file may carry, in bytes (`init` writes 32).
const MAX_SALT: usize = 64;

impl KdfParams {
    /// Memory times passes: how much trying this key file costs.
    pub fn work(&self) -> u64 {
        u64::from(self.memory_kib) * u64::from(self.iterations)
    }

    /// Refuse, before any key derivation, parameters outside what Ferry writes
    /// (docs/formats.md#key-files), so that a hostile key file cannot make
    /// opening a repository allocate or spin without limit. `object` names the
    /// key file in the error.
    pub fn check(&self, object: &str) -> Result<()> {
        if self.algorithm != "argon2id" {
            return Err(Error::corrupt(
                object,
                format!("unknown key derivation {:?}", self.algorithm),
            ));
        }
        if !(8..=MAX_KDF_MEMORY_KIB).contains(&self.memory_kib)
            || !(1..=MAX_KDF_ITERATIONS).contains(&self.iterations)
            || !(1..=MAX_KDF_PARALLELISM).contains(&self.parallelism)
            || self.work() > MAX_KDF_WORK
        {
            return Err(Error::corrupt(
                object,
                format!(
                    "its Argon2id parameters ({} KiB, {} passes, {} lanes) exceed what Ferry writes (at most {MAX_KDF_MEMORY_KIB} KiB, {MAX_KDF_ITERATIONS} passes, {MAX_KDF_PARALLELISM} lanes, {MAX_KDF_WORK} KiB-passes in all); it was not tried",
                    self.memory_kib, self.iterations, self.parallelism
                ),
            ));
        }
        if self.salt.len() > 2 * MAX_SALT || hex::decode(&self.salt).is_err() {
            return Err(Error::corrupt(
                object,
                format!("its salt is not hex of at most {MAX_SALT} bytes"),
            ));
        }
        Ok(())
    }

    fn derive(&self, password: &[u8]) -> Result<Kek> {
        let out = self.key_bytes(password)?;
        Ok(Kek(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &out).expect("AES-256 key is 32 bytes"),
        )))
    }

    /// Argon2id of `password` under these parameters: 32 bytes.
    fn key_bytes(&self, password: &[u8]) -> Result<[u8; 32]> {
        self.check("key file")?;
        let salt =
            hex::decode(&self.salt).map_err(|_| Error::corrupt("key file", "salt is not hex"))?;
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| Error::corrupt("key file", format!("Argon2id parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(password, &salt, &mut out)
            .map_err(|e| Error::corrupt("key file", format!("Argon2id: {e}")))?;
        Ok(out)
    }
}

/// The JSON body of a `keys/<id>` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub kdf: KdfParams,
    /// Hex of the sealed 64-byte master secret.
    pub wrapped: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub host: String,
}

impl KeyFile {
    /// Check everything about a key file that can be checked without the
    /// password: its Argon2id parameters (see [`KdfParams::check`]) and the
    /// shape of its wrapped secret. `object` names it in errors.
    pub fn check(&self, object: &str) -> Result<()> {
        self.kdf.check(object)?;
        if self.wrapped.len() != 2 * (64 + OVERHEAD) || hex::decode(&self.wrapped).is_err() {
            return Err(Error::corrupt(
                object,
                format!("its wrapped key is not {} hex digits", 2 * (64 + OVERHEAD)),
            ));
        }
        Ok(())
    }
}

/// The shortest password `init` accepts, in bytes (NIST SP 800-63B's minimum
/// for a chosen secret).
pub const MIN_PASSWORD_LEN: usize = 8;

/// Refuse a password too weak to protect a new repository: empty, only
/// whitespace, or shorter than [`MIN_PASSWORD_LEN`] bytes. Anyone who can read
/// the bucket can try passwords against its key files offline.
pub fn check_new_password(password: &[u8]) -> Result<()> {
    if password.is_empty() {
        return Err(Error::InvalidInput(
            "the password is empty; choose one of at least 8 characters; nothing was created"
                .into(),
        ));
    }
    let text = String::from_utf8_lossy(password);
    if text.chars().all(char::is_whitespace) {
        return Err(Error::InvalidInput(
            "the password is only whitespace (a stray space or newline?); choose one of at least 8 characters; nothing was created".into(),
        ));
    }
    if password.len() < MIN_PASSWORD_LEN {
        return Err(Error::InvalidInput(format!(
            "the password has {} bytes, fewer than {MIN_PASSWORD_LEN}; choose a longer one (a few words are easy to type and hard to guess); nothing was created",
            password.len()
        )));
    }
    Ok(())
}

fn seal_into(key: &LessSafeKey, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.reserve(plaintext.len() + OVERHEAD);
    out.extend_from_slice(&[0; NONCE_LEN]);
    out.extend_from_slice(plaintext);
    seal_in_place(key, aad, out, at);
}

/// See [`MasterKey::seal_in_place`].
fn seal_in_place(key: &LessSafeKey, aad: &[u8], buf: &mut Vec<u8>, at: usize) {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    buf[at..at + NONCE_LEN].copy_from_slice(&nonce);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf[at + NONCE_LEN..],
        )
        .expect("AES-GCM seals any message under 64 GiB");
    buf.extend_from_slice(tag.as_ref());
}

fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let plain_len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .ok()?
        .len();
    buf.truncate(plain_len);
    Some(buf)
}

/// Fill a buffer from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random source is available");
}

/// A random lowercase hex id of `n` bytes.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    hex::encode(b)
}

/// This machine's host name, as points record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast_kdf() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..KdfParams::default()
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let k = MasterKey::generate();
        let sealed = k.seal(b"ad", b"hello");
        assert_eq!(k.open(b"ad", &sealed).as_deref(), Some(&b"hello"[..]));
        assert!(k.open(b"other ad", &sealed).is_none());
        let mut bad = sealed.clone();
        bad[14] ^= 1;
        assert!(k.open(b"ad", &bad).is_none());
        assert!(MasterKey::generate().open(b"ad", &sealed).is_none());
    }

    #[test]
    fn keys_derive_as_earlier_builds_derived_them_whatever_the_lanes() {
        // Known answers from argon2 0.5.3, which computed lanes one after
        // another (builds before 2026-12-07): key files they wrote, of one
        // lane or of four, still open now that lanes run on threads.
        let kdf = |parallelism| KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism,
            salt: hex::encode([5u8; 32]),
            ..KdfParams::default()
        };
        let hex_of = |p| hex::encode(kdf(p).key_bytes(b"correct horse").unwrap());
        assert_eq!(
            hex_of(1),
            "f79d0d41c5d4d7f1a64a8a1e9a13447ed013ed46a6ecfe20706206dbacc8504a"
        );
        assert_eq!(
            hex_of(4),
            "fda0c9d6761beab1ee8a59a08b12402d1377120161b5e8fe1a498caebb4f3bc6"
        );
        // What init writes: RFC 9106's second recommended option.
        let d = KdfParams::default();
        assert_eq!(
            (d.memory_kib, d.iterations, d.parallelism),
            (64 * 1024, 3, 4)
        );
    }

    #[test]
    fn key_derivation_is_refused_above_the_bounds_naming_the_key_file() {
        let huge = KdfParams {
            memory_kib: 1024 * 1024,
            iterations: 64,
            ..KdfParams::default()
        };
        let err = huge.check("keys/abc").unwrap_err();
        assert!(matches!(&err, Error::Corrupt { object, .. } if object == "keys/abc"));
        assert!(err.to_string().contains("it was not tried"), "{err}");
        // What init writes is accepted, and so is the documented maximum.
        KdfParams::default().check("k").unwrap();
        let max = KdfParams {
            memory_kib: MAX_KDF_MEMORY_KIB,
            iterations: 3,
            parallelism: MAX_KDF_PARALLELISM,
            ..KdfParams::default()
        };
        max.check("k").unwrap();
        let too_much_work = KdfParams {
            iterations: 4,
            ..max
        };
        assert!(too_much_work.check("k").is_err());
    }

    #[test]
    fn new_passwords_must_not_be_empty_blank_or_short() {
        for bad in [&b""[..], b" ", b" \t\n  ", b"short"] {
            let err = check_new_password(bad).unwrap_err();
            assert!(err.is_usage(), "{err}");
            assert!(err.to_string().contains("nothing was created"), "{err}");
        }
        check_new_password(b"correct horse").unwrap();
        // Not UTF-8 is fine: a password is bytes.
        check_new_password(&[0xff, 0xfe, 0x80, 1, 2, 3, 4, 5]).unwrap();
    }

    #[test]
    fn wrap_unwrap_with_right_and_wrong_password() {
        let k = MasterKey::generate();
        let file = k.wrap(b"secret", fast_kdf()).unwrap();
        let back = MasterKey::unwrap(&file, b"secret").unwrap().unwrap();
        assert_eq!(back.chunk_id(b"x"), k.chunk_id(b"x"));
        assert!(MasterKey::unwrap(&file, b"wrong").unwrap().is_none());
    }
}
