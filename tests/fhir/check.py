"""Validates what a live hie node answers with a real FHIR R4 library
(fhir.resources, FHIR 4.0.1 models) and uses a stock FHIR client (fhirpy)
to search and read pointers, following `next` links, to read a pointer's
history and one version, and to page a search begun on one node on another.

Usage: check.py CLUSTER_JSON NHS_NUMBER POINTER_ID
Exits non-zero, naming what failed, if anything does not validate.
"""

import json
import sys

import fhir.resources
import requests
from fhir.resources import construct_fhir_element
from fhirpy import SyncFHIRClient

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def main(cluster_json, nhs, pointer_id):
    assert fhir.resources.__fhir_version__ == "4.0.1", fhir.resources.__fhir_version__
    cluster = json.load(open(cluster_json))
    consumer = next(c for c in cluster["clients"] if "consumer" in c["roles"])
    tls = {"cert": (consumer["cert"], consumer["key"]), "verify": cluster["ca_cert"]}
    base = cluster["nodes"][1]["api_url"]
    session = requests.Session()
    # Not from the environment: REQUESTS_CA_BUNDLE would replace the cluster CA.
    session.trust_env = False
    session.cert, session.verify = tls["cert"], tls["verify"]

    expected = [
        ("CapabilityStatement", f"{base}/metadata", {}),
        ("DocumentReference", f"{base}/DocumentReference/{pointer_id}", {}),
        ("Bundle", f"{base}/DocumentReference", {"subject:identifier": f"{NHS}|{nhs}"}),
        ("Bundle", f"{base}/DocumentReference", {"subject:identifier": f"{NHS}|{nhs}", "_count": "1"}),
        ("Bundle", f"{base}/DocumentReference/_count", {"subject:identifier": f"{NHS}|{nhs}"}),
        ("Parameters", f"{base}/Patient/{nhs}/$record-holders", {}),
        ("OperationOutcome", f"{base}/DocumentReference/A81001-no-such-pointer", {}),
        ("OperationOutcome", f"{base}/DocumentReference", {"subject:identifier": f"{NHS}|1234567890"}),
    ]
    validated = 0
    checked = []
    for resource_type, url, params in expected:
        r = session.get(url, params=params)
        body = r.json()
        if body.get("resourceType") != resource_type:
            sys.exit(f"{url}: expected {resource_type}, got {body.get('resourceType')}")
        construct_fhir_element(resource_type, body)  # raises if it is not valid FHIR R4
        validated += 1
        checked.append(resource_type)
        if resource_type == "Bundle":
            for entry in body.get("entry", []):
                construct_fhir_element(entry["resource"]["resourceType"], entry["resource"])
                validated += 1
                checked.append(entry["resource"]["resourceType"])

    # A Consent recorded by the consent authority (for another test patient).
    authority = next(c for c in cluster["clients"] if "consent-authority" in c["roles"])
    consent = {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": NHS, "value": "9434765919"}},
        "provision": {"type": "deny"},
    }
    construct_fhir_element("Consent", consent)
    r = requests.post(f"{base}/Consent", json=consent, cert=(authority["cert"], authority["key"]), verify=tls["verify"],
                      headers={"content-type": "application/fhir+json"})
    if r.status_code != 201:
        sys.exit(f"Consent: {r.status_code} {r.text}")
    construct_fhir_element("Consent", r.json())
    validated += 1
    checked.append("Consent")

    client = SyncFHIRClient(base, requests_config=tls)
    found = client.resources("DocumentReference").search(subject__identifier=f"{NHS}|{nhs}").limit(1).fetch_all()
    ids = sorted(r["id"] for r in found)
    if pointer_id not in ids:
        sys.exit(f"fhirpy search did not find {pointer_id}: {ids}")
    one = client.reference("DocumentReference", pointer_id).to_resource()
    if one["id"] != pointer_id or one["status"] != "current":
        sys.exit(f"fhirpy read returned {one}")

    # History and one version, read by the stock client on another node.
    other = SyncFHIRClient(cluster["nodes"][2]["api_url"], requests_config=tls)
    history = other.execute(f"DocumentReference/{pointer_id}/_history", method="get")
    construct_fhir_element("Bundle", history)
    if history["type"] != "history":
        sys.exit(f"_history answered a {history['type']} Bundle")
    versions = [e["resource"]["meta"]["versionId"] for e in history["entry"]]
    if len(versions) < 2 or versions != sorted(versions, key=int, reverse=True):
        sys.exit(f"_history versions {versions}: expected at least two, newest first")
    oldest = other.execute(f"DocumentReference/{pointer_id}/_history/{versions[-1]}", method="get")
    construct_fhir_element("DocumentReference", oldest)
    if oldest["meta"]["versionId"] != versions[-1]:
        sys.exit(f"vread of version {versions[-1]} answered {oldest['meta']}")

    # A search begun on node 2 and continued on node 3 with its next links.
    page = client.resources("DocumentReference").search(subject__identifier=f"{NHS}|{nhs}").limit(1).fetch_raw()
    paged = [e["resource"]["id"] for e in page["entry"]]
    pages = 1
    while True:
        nexts = [l["url"] for l in page.get("link", []) if l["relation"] == "next"]
        if not nexts:
            break
        token = nexts[0].split("next=", 1)[1]
        page = other.execute("DocumentReference", method="get", params={"next": token})
        construct_fhir_element("Bundle", page)
        paged += [e["resource"]["id"] for e in page["entry"]]
        pages += 1
    if sorted(paged) != ids:
        sys.exit(f"paging across nodes found {sorted(paged)}, not {ids}")
    print(f"fhir: {validated} resources valid FHIR R4 ({', '.join(checked)}); fhirpy found {len(ids)} pointers over pages of 1 and read {pointer_id}; "
          f"read its {len(versions)} versions and version {versions[-1]} on another node; paged {pages} pages from node 2 to node 3")


if __name__ == "__main__":
    main(*sys.argv[1:])
