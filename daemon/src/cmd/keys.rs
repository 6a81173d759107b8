//! What opens an encrypted volume: a key file or a passphrase (`--keyfile`/`--passphrase` of
//! the volume and snapshot commands, `-o keyfile=`/`-o passphrase` of a mount), and key errors
//! explained for people.

use anyhow::{anyhow, bail, Context, Result};
use dbqsfs_fs::crypt::{KeyError, Secret};
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use zeroize::Zeroizing;

/// The environment variable a script puts a volume's passphrase in (instead of a prompt).
pub const PASSPHRASE_ENV: &str = "DBQSFS_PASSPHRASE";
/// The new passphrase of `dbqsfs volume rekey --new-passphrase`, for scripts.
pub const NEW_PASSPHRASE_ENV: &str = "DBQSFS_NEW_PASSPHRASE";

/// What opens an encrypted volume.
#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    /// The volume's key file.
    #[arg(long, value_name = "PATH", conflicts_with = "passphrase")]
    pub keyfile: Option<PathBuf>,
    /// Ask for the volume's passphrase on the terminal (or read $DBQSFS_PASSPHRASE).
    #[arg(long)]
    pub passphrase: bool,
}

impl KeyArgs {
    /// The secret these arguments name, if any (prompting for a passphrase; `confirm` asks twice).
    pub fn secret(&self, confirm: bool) -> Result<Option<Secret>> {
        match (&self.keyfile, self.passphrase) {
            (Some(p), _) => Ok(Some(Secret::key_file(p)?)),
            (None, true) => Ok(Some(Secret::Passphrase(passphrase(
                PASSPHRASE_ENV,
                "volume passphrase: ",
                confirm,
            )?))),
            (None, false) => Ok(None),
        }
    }
}

/// A passphrase from `env`, else the terminal (asked twice with `confirm`), else a line of stdin.
pub fn passphrase(env: &str, prompt: &str, confirm: bool) -> Result<Zeroizing<Vec<u8>>> {
    let p = if let Ok(p) = std::env::var(env) {
        Zeroizing::new(p)
    } else if std::io::stdin().is_terminal() {
        let p =
            Zeroizing::new(rpassword::prompt_password(prompt).context("reading the passphrase")?);
        if confirm {
            let again = Zeroizing::new(
                rpassword::prompt_password("again: ").context("reading the passphrase")?,
            );
            if *again != *p {
                bail!("the two passphrases differ; nothing was changed");
            }
        }
        p
    } else {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the passphrase from standard input")?;
        let trimmed = line.trim_end_matches(['\r', '\n']).to_string();
        Zeroizing::new(trimmed)
    };
    if p.is_empty() {
        bail!("an empty passphrase is refused: type one, set ${env}, or use a key file instead");
    }
    Ok(Zeroizing::new(p.as_bytes().to_vec()))
}

/// Turns a key error into one that names the volume and says what to do.
pub fn explain(e: KeyError, volume: &str) -> anyhow::Error {
    match e {
        KeyError::NotEncrypted => anyhow!(
            "volume {volume:?} is not encrypted; leave out the key file and passphrase options"
        ),
        KeyError::WrongSecret => anyhow!(
            "the passphrase or key file does not open volume {volume:?}'s key; nothing was \
             changed (check the key file's path, or retype the passphrase)"
        ),
        KeyError::AlreadyEncrypted => anyhow!("volume {volume:?} already has a key"),
        e => anyhow!("volume {volume:?}: {e}"),
    }
}
