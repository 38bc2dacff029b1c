// Validate prometheus-operator custom resources against the CRD schemas of the npm package
// @kubernetes-models/prometheus-operator (scripts/fetch-crd-schemas).
//   node validate_custom_resources.mjs MODELS_DIR < docs.json
// stdin: a JSON list of objects; stdout: a JSON list, per object null (valid) or the errors.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.argv[2];
const v1 = await import(pathToFileURL(join(dir, "node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js")).href);
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = docs.map((doc) => {
  if (doc.apiVersion !== "monitoring.coreos.com/v1" || !(doc.kind in v1)) {
    return `no schema for ${doc.apiVersion} ${doc.kind}`;
  }
  try {
    new v1[doc.kind](doc).validate();
    return null;
  } catch (error) {
    return String(error.message ?? error);
  }
});
process.stdout.write(JSON.stringify(results));
