{{/* Names and labels: one place (DESIGN.md, Helm conventions). */}}

{{- define "mosmedai.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mosmedai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>, within the 63-character name limit. */}}
{{- define "mosmedai.componentName" -}}
{{- printf "%s-%s" (include "mosmedai.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "mosmedai.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mosmedai.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mosmedai.labels" -}}
{{ include "mosmedai.selectorLabels" . }}
app.kubernetes.io/part-of: mosmedai
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An image reference: registry override (air-gapped mirrors), repository, tag or digest. */}}
{{- define "mosmedai.image" -}}
{{- $image := .image -}}
{{- $registry := default $image.registry .root.Values.imageRegistry -}}
{{- $ref := $image.repository -}}
{{- if $registry -}}{{- $ref = printf "%s/%s" $registry $image.repository -}}{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $ref $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "mosmedai.imagePullSecrets" -}}
imagePullSecrets:
{{- range .Values.imagePullSecrets }}
  - name: {{ . | quote }}
{{- else }} []
{{- end }}
{{- end -}}

{{/* Pod-level security context shared by every pod of the chart. */}}
{{- define "mosmedai.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.security.runAsUser }}
  runAsGroup: {{ .Values.security.runAsUser }}
  fsGroup: {{ .Values.security.runAsUser }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: every container of the chart. */}}
{{- define "mosmedai.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The object-storage Secret's name: the SRE's own, or the chart's. */}}
{{- define "mosmedai.objectStorageSecret" -}}
{{- default (include "mosmedai.componentName" (dict "root" . "component" "object-storage")) .Values.objectStorage.existingSecret -}}
{{- end -}}

{{/* The model repository URI as Triton reads it (--model-repository). Triton talks HTTP to a
     custom S3 endpoint unless the host is prefixed with https:// (Triton user guide,
     "model repository: S3"). */}}
{{- define "mosmedai.tritonModelRepository" -}}
{{- $s3 := .Values.objectStorage -}}
{{- $path := trimAll "/" (printf "%s/%s" $s3.bucket $s3.prefix) -}}
{{- if $s3.endpoint -}}
{{- if hasPrefix "https://" $s3.endpoint -}}
{{- printf "s3://%s/%s" (trimSuffix "/" $s3.endpoint) $path -}}
{{- else -}}
{{- printf "s3://%s/%s" (trimSuffix "/" (trimPrefix "http://" $s3.endpoint)) $path -}}
{{- end -}}
{{- else -}}
{{- printf "s3://%s" $path -}}
{{- end -}}
{{- end -}}

{{/* GpuPool object name of a region: its `name`, or the code in lower case (RU-MOW -> ru-mow). */}}
{{- define "mosmedai.poolName" -}}
{{- default (lower .code) .name -}}
{{- end -}}

{{/* The region whose Triton pool the gateway calls, checked against regions. */}}
{{- define "mosmedai.gatewayRegion" -}}
{{- $code := .Values.gateway.tritonRegion | default (index .Values.regions 0).code -}}
{{- $found := dict -}}
{{- range .Values.regions -}}{{- if eq .code $code -}}{{- $_ := set $found "pool" (include "mosmedai.poolName" .) -}}{{- end -}}{{- end -}}
{{- if not $found.pool -}}
{{- fail (printf "gateway.tritonRegion: %q is not the code of any entry in regions" $code) -}}
{{- end -}}
{{- $found.pool -}}
{{- end -}}

{{/* host:port of the gRPC endpoint of the gateway's Triton pool: the Service the operator
     names like the GpuPool (operators/mosmedai_operator/children.py, gRPC port 8001). */}}
{{- define "mosmedai.tritonUrl" -}}
{{- printf "%s.%s.svc:8001" (include "mosmedai.gatewayRegion" .) .Release.Namespace -}}
{{- end -}}

{{/* MOSMEDAI_* settings of the gateway and router (services/mosmedai/config.py). */}}
{{- define "mosmedai.gatewayEnv" -}}
- name: MOSMEDAI_BIND_HOST
  value: "0.0.0.0"
- name: MOSMEDAI_GATEWAY_HTTP_PORT
  value: {{ .Values.gateway.port | quote }}
- name: MOSMEDAI_TRITON_URL
  value: {{ include "mosmedai.tritonUrl" . | quote }}
- name: MOSMEDAI_TRITON_HTTP_URL
  value: {{ printf "http://%s.%s.svc:8000" (include "mosmedai.gatewayRegion" .) .Release.Namespace | quote }}
- name: MOSMEDAI_ENABLED_TOOLS
  value: {{ toJson .Values.gateway.enabledTools | quote }}
- name: MOSMEDAI_ROUTER_MAX_BATCH_SIZE
  value: {{ .Values.gateway.routerMaxBatchSize | quote }}
- name: MOSMEDAI_ROUTER_BATCH_WAIT_MS
  value: {{ .Values.gateway.routerBatchWaitMs | quote }}
- name: MOSMEDAI_TRITON_TIMEOUT_S
  value: {{ .Values.gateway.tritonTimeoutSeconds | quote }}
- name: MOSMEDAI_MAX_BODY_BYTES
  value: {{ .Values.gateway.maxBodyBytes | int64 | quote }}
# Label of the gateway's and router's metrics: the region whose pool serves.
- name: MOSMEDAI_REGION
  value: {{ .Values.gateway.tritonRegion | default (index .Values.regions 0).code | quote }}
# The router's own /metrics endpoint (the gateway's is /metrics on its HTTP port).
- name: MOSMEDAI_ROUTER_METRICS_PORT
  value: "8201"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- range $key, $value := .Values.gateway.extraEnv }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Fail with the value's name: what values.schema.json cannot compare. */}}
{{- define "mosmedai.validate" -}}
{{- if eq (len .Values.regions) 0 -}}
{{- fail "regions: at least one region is needed (the gateway sends to a region's Triton pool)" -}}
{{- end -}}
{{- $names := dict -}}
{{- range $i, $r := .Values.regions -}}
{{- $min := int (default 1 (($r.replicas | default dict).min)) -}}
{{- if hasKey ($r.replicas | default dict) "min" }}{{ $min = int $r.replicas.min }}{{ end -}}
{{- $max := int (default 4 (($r.replicas | default dict).max)) -}}
{{- if gt $min $max -}}
{{- fail (printf "regions[%d].replicas.min (%d) is greater than regions[%d].replicas.max (%d) for region %s" $i $min $i $max $r.code) -}}
{{- end -}}
{{- $pool := include "mosmedai.poolName" $r -}}
{{- if hasKey $names $pool -}}
{{- fail (printf "regions[%d]: GpuPool name %q is used twice (regions[].code or regions[].name)" $i $pool) -}}
{{- end -}}
{{- $_ := set $names $pool true -}}
{{- range $j, $w := ($r.schedule | default list) -}}
{{- if gt (int $w.minReplicas) $max -}}
{{- fail (printf "regions[%d].schedule[%d].minReplicas (%d) is greater than regions[%d].replicas.max (%d)" $i $j (int $w.minReplicas) $i $max) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas) -}}
{{- fail (printf "gateway.autoscaling.minReplicas (%d) is greater than gateway.autoscaling.maxReplicas (%d)" (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if gt (int .Values.ray.kuberay.workers.minReplicas) (int .Values.ray.kuberay.workers.maxReplicas) -}}
{{- fail (printf "ray.kuberay.workers.minReplicas (%d) is greater than ray.kuberay.workers.maxReplicas (%d)" (int .Values.ray.kuberay.workers.minReplicas) (int .Values.ray.kuberay.workers.maxReplicas)) -}}
{{- end -}}
{{- if .Values.dimse.enabled -}}
{{- fail "dimse.enabled: the DIMSE (C-STORE, port 11112) service is not part of the platform yet (a later issue delivers it); leave it false" -}}
{{- end -}}
{{- if .Values.dicomweb.enabled -}}
{{- fail "dicomweb.enabled: the DICOMweb (STOW-RS) service is not part of the platform yet (a later issue delivers it); leave it false" -}}
{{- end -}}
{{- if and .Values.objectStorage.existingSecret (or .Values.objectStorage.accessKeyId .Values.objectStorage.secretAccessKey) -}}
{{- fail "objectStorage.existingSecret is set together with objectStorage.accessKeyId/secretAccessKey: use one or the other" -}}
{{- end -}}
{{- if ne (empty .Values.objectStorage.accessKeyId) (empty .Values.objectStorage.secretAccessKey) -}}
{{- fail "objectStorage.accessKeyId and objectStorage.secretAccessKey: set both or neither" -}}
{{- end -}}
{{- end -}}
