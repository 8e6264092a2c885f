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
pub use crate::civil::rfc3339;

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
