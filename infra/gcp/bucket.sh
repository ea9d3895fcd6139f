#!/usr/bin/env bash
# Create the bucket the jobs expect, the Google service account that may use it, and the Workload
# Identity binding for the Kubernetes service account `aisd-ray` (infra/kuberay/serviceaccount.yaml).
#
#   PROJECT_ID=my-project BUCKET=my-aisd-bucket REGION=us-central1 infra/gcp/bucket.sh
#
# Layout:  gs://$BUCKET/data/     shard stores from `aisd-ray prepare` (one folder per store)
#          gs://$BUCKET/runs/     training runs and searches (checkpoints, history, plots)
#          gs://$BUCKET/exports/  SavedModels for serving
# Safe to rerun: each step skips what already exists.
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${BUCKET:?set BUCKET}"
REGION="${REGION:-us-central1}"
NAMESPACE="${NAMESPACE:-default}"
GSA="aisd-ray@${PROJECT_ID}.iam.gserviceaccount.com"

gcloud storage buckets describe "gs://${BUCKET}" --project "${PROJECT_ID}" >/dev/null 2>&1 \
  || gcloud storage buckets create "gs://${BUCKET}" --project "${PROJECT_ID}" --location "${REGION}" \
       --uniform-bucket-level-access --public-access-prevention
for prefix in data runs exports; do   # object stores have no folders: a marker makes each visible
  echo "aisd-ray ${prefix}/" | gcloud storage cp - "gs://${BUCKET}/${prefix}/README.txt"
done

HEAD_GSA="aisd-ray-head@${PROJECT_ID}.iam.gserviceaccount.com"
for account in aisd-ray aisd-ray-head; do
  gcloud iam service-accounts describe "${account}@${PROJECT_ID}.iam.gserviceaccount.com" --project "${PROJECT_ID}" \
      >/dev/null 2>&1 \
    || gcloud iam service-accounts create "${account}" --project "${PROJECT_ID}" --display-name "${account}"
  # both use the bucket and pull the image
  gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" \
    --member "serviceAccount:${account}@${PROJECT_ID}.iam.gserviceaccount.com" --role roles/storage.objectAdmin >/dev/null
  gcloud projects add-iam-policy-binding "${PROJECT_ID}" --condition=None \
    --member "serviceAccount:${account}@${PROJECT_ID}.iam.gserviceaccount.com" \
    --role roles/artifactregistry.reader >/dev/null
done
# The cluster launcher's head (infra/gcp/cluster.yaml) runs the autoscaler: it creates and deletes
# worker VMs and attaches the worker account to them.
gcloud projects add-iam-policy-binding "${PROJECT_ID}" --condition=None \
  --member "serviceAccount:${HEAD_GSA}" --role roles/compute.instanceAdmin.v1 >/dev/null
gcloud iam service-accounts add-iam-policy-binding "${GSA}" --project "${PROJECT_ID}" \
  --member "serviceAccount:${HEAD_GSA}" --role roles/iam.serviceAccountUser >/dev/null
# GKE pods running as KSA ${NAMESPACE}/aisd-ray act as the GSA (Workload Identity; no key files).
gcloud iam service-accounts add-iam-policy-binding "${GSA}" --project "${PROJECT_ID}" \
  --role roles/iam.workloadIdentityUser \
  --member "serviceAccount:${PROJECT_ID}.svc.id.goog[${NAMESPACE}/aisd-ray]" >/dev/null
echo "gs://${BUCKET} ready: data/ runs/ exports/; service accounts ${GSA} (jobs) and ${HEAD_GSA} (launcher head)"
