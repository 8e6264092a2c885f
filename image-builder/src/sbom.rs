//! The SPDX 2.3 software bill of materials of an image: every file of the
//! root filesystem, the initramfs and the ESP, with its checksums and where
//! it came from.

use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::tree::{NodeKind, Origin, Tree};

/// One file for the SBOM that is not part of a tree (ESP content).
#[derive(Debug, Clone)]
pub struct ExtraFile<'a> {
    /// Path as shown, e.g. `esp:/a/vmlinuz`.
    pub name: String,
    /// Content.
    pub data: &'a [u8],
    /// Provenance.
    pub origin: Origin,
}

/// What the SBOM describes.
#[derive(Debug, Clone)]
pub struct SbomInput<'a> {
    /// Image name.
    pub name: &'a str,
    /// Image version.
    pub version: &'a str,
    /// RFC 3339 creation time (from SOURCE_DATE_EPOCH).
    pub created: String,
    /// Kernel package name and version, if from a package.
    pub kernel_package: Option<(&'a str, &'a str)>,
    /// Trees with a prefix for their paths (`rootfs:`, `initrd:`).
    pub trees: Vec<(&'a str, &'a Tree)>,
    /// Files outside the trees.
    pub extra: Vec<ExtraFile<'a>>,
}

fn comment(origin: &Origin) -> String {
    match origin {
        Origin::Build => "made by basalt".to_string(),
        Origin::Recipe(what) => format!("recipe: {what}"),
        Origin::Kernel(pkg) => format!("kernel: {pkg}"),
    }
}

fn file_json(index: usize, name: &str, data: &[u8], origin: &Origin) -> Value {
    json!({
        "fileName": name,
        "SPDXID": format!("SPDXRef-File-{index}"),
        "checksums": [
            { "algorithm": "SHA1", "checksumValue": hex::encode(Sha1::digest(data)) },
            { "algorithm": "SHA256", "checksumValue": hex::encode(Sha256::digest(data)) }
        ],
        "licenseConcluded": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": comment(origin),
    })
}

/// The RFC 3339 UTC time of a Unix timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for all u64 days
    // after the epoch that fit in years of four digits.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// The SBOM as SPDX 2.3 JSON.
pub fn spdx_json(input: &SbomInput<'_>) -> Value {
    let mut files = Vec::new();
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    let mut add = |name: &str, data: &[u8], origin: &Origin| {
        let idx = files.len() + 1;
        files.push(file_json(idx, name, data, origin));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": format!("SPDXRef-File-{idx}"),
        }));
    };
    for (prefix, tree) in &input.trees {
        for (path, node) in tree.iter() {
            if let NodeKind::File(data) = &node.kind {
                add(&format!("{prefix}{path}"), data, &node.origin);
            }
        }
    }
    for f in &input.extra {
        add(&f.name, f.data, &f.origin);
    }
    let mut packages = vec![json!({
        "name": input.name,
        "SPDXID": "SPDXRef-Image",
        "versionInfo": input.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "OPERATING-SYSTEM",
    })];
    if let Some((name, version)) = input.kernel_package {
        packages.push(json!({
            "name": name,
            "SPDXID": "SPDXRef-Kernel",
            "versionInfo": version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "GPL-2.0-only",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!("pkg:deb/debian/{name}@{version}?arch=amd64"),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": "SPDXRef-Kernel",
        }));
    }
    packages.push(json!({
        "name": "basalt-init",
        "SPDXID": "SPDXRef-BasaltInit",
        "versionInfo": env!("CARGO_PKG_VERSION"),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "Apache-2.0",
        "copyrightText": "NOASSERTION",
    }));
    relationships.push(json!({
        "spdxElementId": "SPDXRef-Image",
        "relationshipType": "CONTAINS",
        "relatedSpdxElement": "SPDXRef-BasaltInit",
    }));
    let namespace_hash = hex::encode(
        &Sha256::digest(format!("{} {} {}", input.name, input.version, input.created).as_bytes())
            [..8],
    );
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}-{}", input.name, input.version),
        "documentNamespace": format!("https://spdx.org/spdxdocs/basalt/{}-{}-{namespace_hash}", input.name, input.version),
        "creationInfo": {
            "created": input.created,
            "creators": [format!("Tool: basalt-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "files": files,
        "relationships": relationships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
