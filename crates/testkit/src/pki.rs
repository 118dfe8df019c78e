//! Certificates for TLS tests, made by `openssl`: a private CA, another CA that signed
//! nothing of ours, and server certificates the first one signs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::temp_dir;

/// A CA and server certificates it signed, as PEM files in one directory.
pub struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new EC P-256 key and, with `extra`, what `openssl req` makes of it.
fn new_key(dir: &Path, name: &str, extra: &[&str]) {
    let key = format!("{name}.key");
    let args = [
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
    ];
    openssl(dir, &[&args[..], extra].concat());
}

impl Pki {
    pub fn new() -> Pki {
        let dir = temp_dir("pki");
        for ca in ["ca", "other-ca"] {
            let (out, subject) = (format!("{ca}.pem"), format!("/CN=Cascade test {ca}"));
            new_key(
                &dir,
                ca,
                &["-x509", "-out", &out, "-days", "2", "-subj", &subject],
            );
        }
        Pki { dir }
    }

    /// A server certificate for `name` (a DNS name, or an IP address such as `127.0.0.1`)
    /// signed by the CA: (certificate, key) in PEM.
    pub fn server(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let ext = self.dir.join(format!("{name}.ext"));
        let kind = if name.parse::<std::net::IpAddr>().is_ok() {
            "IP"
        } else {
            "DNS"
        };
        std::fs::write(&ext, format!("subjectAltName={kind}:{name}\n")).unwrap();
        let (csr, subject) = (format!("{name}.csr"), format!("/CN={name}"));
        new_key(&self.dir, name, &["-out", &csr, "-subj", &subject]);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        let read = |file: String| std::fs::read(self.dir.join(file)).unwrap();
        (read(format!("{name}.pem")), read(format!("{name}.key")))
    }

    /// The CA's certificate file.
    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// The other CA's certificate file: it signed none of [`server`](Self::server)'s.
    pub fn other_ca(&self) -> String {
        self.dir.join("other-ca.pem").display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
