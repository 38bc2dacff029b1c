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

{{/* The one Triton pool of the Open Inference Protocol passthrough (the gRPC front door and
     the gateway's /v2 REST calls, which name a model, not a region): the first region's.
     The router itself finds every pool by watching the GpuPools (MOSMEDAI_POOL_DISCOVERY). */}}
{{- define "mosmedai.passthroughPool" -}}
{{- include "mosmedai.poolName" (index .Values.regions 0) -}}
{{- end -}}

{{/* host:port of the gRPC endpoint of the passthrough pool: the Service the operator
     names like the GpuPool (operators/mosmedai_operator/children.py, gRPC port 8001). */}}
{{- define "mosmedai.tritonUrl" -}}
{{- printf "%s.%s.svc:8001" (include "mosmedai.passthroughPool" .) .Release.Namespace -}}
{{- end -}}

{{/* MOSMEDAI_* settings of the gateway and router (services/mosmedai/config.py). */}}
{{- define "mosmedai.gatewayEnv" -}}
- name: MOSMEDAI_BIND_HOST
  value: "0.0.0.0"
- name: MOSMEDAI_GATEWAY_HTTP_PORT
  value: {{ .Values.gateway.port | quote }}
# The gRPC door (mosmedai.ingress.grpc_door) is the gateway replica's own.
- name: MOSMEDAI_GRPC_PORT
  value: {{ .Values.grpc.port | quote }}
- name: MOSMEDAI_TRITON_URL
  value: {{ include "mosmedai.tritonUrl" . | quote }}
- name: MOSMEDAI_TRITON_HTTP_URL
  value: {{ printf "http://%s.%s.svc:8000" (include "mosmedai.passthroughPool" .) .Release.Namespace | quote }}
# The router's pools: the GpuPools of the release's namespace, watched through the API
# server (mosmedai.serving.pool_discovery; the router ServiceAccount may get, list and watch them).
- name: MOSMEDAI_POOL_DISCOVERY
  value: kubernetes
- name: MOSMEDAI_POOL_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: MOSMEDAI_ENABLED_TOOLS
  value: {{ toJson .Values.gateway.enabledTools | quote }}
# Per-region tool choice: the toolChoice ConfigMap, re-read when it changes (no checksum
# annotation on purpose: a change must not restart the pods).
- name: MOSMEDAI_TOOLS_CONFIG
  value: /etc/mosmedai/tools/tools.yaml
- name: MOSMEDAI_TOOLS_CONFIG_POLL_S
  value: {{ .Values.toolChoice.pollSeconds | quote }}
- name: MOSMEDAI_ROUTER_MAX_BATCH_SIZE
  value: {{ .Values.gateway.routerMaxBatchSize | quote }}
- name: MOSMEDAI_ROUTER_BATCH_WAIT_MS
  value: {{ .Values.gateway.routerBatchWaitMs | quote }}
- name: MOSMEDAI_TRITON_TIMEOUT_S
  value: {{ .Values.gateway.tritonTimeoutSeconds | quote }}
- name: MOSMEDAI_MAX_BODY_BYTES
  value: {{ .Values.gateway.maxBodyBytes | int64 | quote }}
# Graceful drain of the gateway and router replicas (Ray Serve graceful_shutdown_timeout_s):
# the grace period of the pod is derived from the same value (values.yaml drain).
- name: MOSMEDAI_GATEWAY_SHUTDOWN_S
  value: {{ .Values.drain.gateway.shutdownSeconds | quote }}
# The router's own /metrics endpoint (the gateway's is /metrics on its HTTP port).
- name: MOSMEDAI_ROUTER_METRICS_PORT
  value: "8201"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{ include "mosmedai.platformEnv" . }}
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
{{- range $where, $env := dict "gateway.extraEnv" .Values.gateway.extraEnv "dimse.extraEnv" .Values.dimse.extraEnv -}}
{{- range $key := list "MOSMEDAI_DEMO_TENANTS" "MOSMEDAI_PROFILE" "MOSMEDAI_TENANTS_FILE" -}}
{{- if hasKey $env $key -}}
{{- fail (printf "%s.%s: the chart sets it (profile cluster, demo tenants never, tenants from the tenants Secret); demo tenants and their published tokens are refused outside the local profile" $where $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tenants.existingSecret .Values.tenants.items -}}
{{- fail "tenants.existingSecret is set together with tenants.items: use one or the other" -}}
{{- end -}}
{{- $ids := dict -}}{{- $hashes := dict -}}{{- $aes := dict -}}
{{- range $i, $t := .Values.tenants.items -}}
{{- if hasKey $ids $t.id -}}{{- fail (printf "tenants.items[%d].id: %q is used twice" $i $t.id) -}}{{- end -}}
{{- $_ := set $ids $t.id true -}}
{{- if hasKey $hashes $t.token_sha256 -}}{{- fail (printf "tenants.items[%d].token_sha256: same token as tenant %q" $i (get $hashes $t.token_sha256)) -}}{{- end -}}
{{- $_ := set $hashes $t.token_sha256 $t.id -}}
{{- with $t.dimse -}}
{{- $ae := trim .called_ae_title -}}
{{- if hasKey $aes $ae -}}{{- fail (printf "tenants.items[%d].dimse.called_ae_title: %q is used by tenant %q too" $i $ae (get $aes $ae)) -}}{{- end -}}
{{- $_ := set $aes $ae $t.id -}}
{{- end -}}
{{- end -}}
{{- if and .Values.dimse.enabled (gt (int .Values.dimse.replicas) 1) (ne .Values.dimse.service.sessionAffinity "ClientIP") -}}
{{- fail (printf "dimse.replicas (%d) > 1 needs dimse.service.sessionAffinity: ClientIP (series completion is per pod)" (int .Values.dimse.replicas)) -}}
{{- end -}}
{{- if and .Values.dimse.service.nodePort (ne .Values.dimse.service.type "NodePort") -}}
{{- fail "dimse.service.nodePort is set but dimse.service.type is not NodePort" -}}
{{- end -}}
{{- if and .Values.objectStorage.existingSecret (or .Values.objectStorage.accessKeyId .Values.objectStorage.secretAccessKey) -}}
{{- fail "objectStorage.existingSecret is set together with objectStorage.accessKeyId/secretAccessKey: use one or the other" -}}
{{- end -}}
{{- if ne (empty .Values.objectStorage.accessKeyId) (empty .Values.objectStorage.secretAccessKey) -}}
{{- fail "objectStorage.accessKeyId and objectStorage.secretAccessKey: set both or neither" -}}
{{- end -}}
{{- end -}}

{{/* --- TensorRT engines per GPU product ------------------------------------------------- */}}

{{/* A GPU product label value as the engine cache spells it (tensorrt_build.slug):
     lower case, every run of other characters one hyphen. NVIDIA-A100-SXM4-80GB -> nvidia-a100-sxm4-80gb */}}
{{- define "mosmedai.productSlug" -}}
{{- regexReplaceAll "[^a-z0-9]+" (lower .) "-" | trimAll "-" -}}
{{- end -}}

{{/* Engine builds as JSON: {product: {"tools": [...], "region": <first region of the product>}}
     for every distinct gpu.product of a GPU pool (gpu.count > 0); empty when tensorrt.enabled
     is false. Pools without a product (any GPU) get no engines: a plan is per product. */}}
{{- define "mosmedai.engineBuilds" -}}
{{- $builds := dict -}}
{{- if .Values.tensorrt.enabled -}}
{{- range .Values.regions -}}
{{- $gpu := .gpu | default dict -}}
{{- $count := 1 -}}{{- if hasKey $gpu "count" -}}{{- $count = int $gpu.count -}}{{- end -}}
{{- if and (gt $count 0) $gpu.product -}}
{{- $entry := get $builds $gpu.product | default (dict "tools" list "region" .) -}}
{{- $_ := set $entry "tools" (concat $entry.tools .tools | uniq) -}}
{{- $_ := set $builds $gpu.product $entry -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $builds -}}
{{- end -}}

{{/* Key prefix of a product's gpu repository: <tensorrt.prefix>/<product slug>/trt-<version>. */}}
{{- define "mosmedai.gpuRepositoryPrefix" -}}
{{- printf "%s/%s/trt-%s" (trimAll "/" .root.Values.tensorrt.prefix) (include "mosmedai.productSlug" .product) .root.Values.tensorrt.version -}}
{{- end -}}

{{/* An s3:// URI as Triton reads it, for a key prefix of objectStorage.bucket. */}}
{{- define "mosmedai.tritonUri" -}}
{{- $s3 := .root.Values.objectStorage -}}
{{- $path := trimAll "/" (printf "%s/%s" $s3.bucket .prefix) -}}
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

{{/* The repository URI a region's Triton should read: its product's gpu repository when
     engines are built for it, else the cpu (ONNX) repository. */}}
{{- define "mosmedai.regionRepository" -}}
{{- $builds := include "mosmedai.engineBuilds" .root | fromJson -}}
{{- $gpu := .region.gpu | default dict -}}
{{- $product := $gpu.product | default "" -}}
{{- $count := 1 -}}{{- if hasKey $gpu "count" -}}{{- $count = int $gpu.count -}}{{- end -}}
{{- if and (gt $count 0) $product (hasKey $builds $product) -}}
{{- include "mosmedai.tritonUri" (dict "root" .root "prefix" (include "mosmedai.gpuRepositoryPrefix" (dict "root" .root "product" $product))) -}}
{{- else -}}
{{- include "mosmedai.tritonModelRepository" .root -}}
{{- end -}}
{{- end -}}

{{/* The operator's fallback --model-repository (MOSMEDAI_OPERATOR_TRITON_MODEL_REPOSITORY),
     for a GpuPool without spec.modelRepository: the repository every region reads when
     they all read the same one, else the cpu repository, which every pool can load. */}}
{{- define "mosmedai.operatorRepository" -}}
{{- $uris := list -}}
{{- range .Values.regions -}}
{{- $uris = append $uris (include "mosmedai.regionRepository" (dict "root" $ "region" .)) -}}
{{- end -}}
{{- $uris = uniq $uris -}}
{{- if eq (len $uris) 1 -}}
{{- first $uris -}}
{{- else -}}
{{- include "mosmedai.tritonModelRepository" . -}}
{{- end -}}
{{- end -}}

{{/* --- tenants, jobs' object storage ------------------------------------------------------ */}}

{{- define "mosmedai.tenantsSecret" -}}
{{- default (include "mosmedai.componentName" (dict "root" . "component" "tenants")) .Values.tenants.existingSecret -}}
{{- end -}}

{{- define "mosmedai.tenantsKey" -}}
{{- if .Values.tenants.existingSecret -}}{{ .Values.tenants.existingSecretKey }}{{- else -}}tenants.yaml{{- end -}}
{{- end -}}

{{- define "mosmedai.deidSecret" -}}
{{- default (include "mosmedai.componentName" (dict "root" . "component" "deid")) .Values.jobs.deidSecret.existingSecret -}}
{{- end -}}

{{/* The S3 endpoint URL the platform's jobs use (MOSMEDAI_S3_ENDPOINT_URL): objectStorage's,
     with a scheme; AWS S3 of the region when objectStorage.endpoint is empty. */}}
{{- define "mosmedai.s3EndpointUrl" -}}
{{- $e := .Values.objectStorage.endpoint -}}
{{- if not $e -}}
{{- printf "https://s3.%s.amazonaws.com" .Values.objectStorage.region -}}
{{- else if or (hasPrefix "http://" $e) (hasPrefix "https://" $e) -}}
{{- $e -}}
{{- else -}}
{{- printf "http://%s" $e -}}
{{- end -}}
{{- end -}}

{{/* Settings of every platform process that holds tenants and talks to the job store
     (gateway, Ray workers, gRPC, DIMSE): cluster profile, never the demo tenants. */}}
{{- define "mosmedai.platformEnv" -}}
- name: MOSMEDAI_PROFILE
  value: cluster
# The demo tenants' tokens are published: a cluster never has them (the platform refuses
# them outside the local profile anyway).
- name: MOSMEDAI_DEMO_TENANTS
  value: "false"
- name: MOSMEDAI_TENANTS_FILE
  value: /etc/mosmedai/tenants/tenants.yaml
- name: MOSMEDAI_S3_ENDPOINT_URL
  value: {{ include "mosmedai.s3EndpointUrl" . | quote }}
- name: MOSMEDAI_S3_REGION
  value: {{ .Values.objectStorage.region | quote }}
- name: MOSMEDAI_INCOMING_BUCKET
  value: {{ .Values.jobs.incomingBucket | quote }}
- name: MOSMEDAI_RESULTS_BUCKET
  value: {{ .Values.jobs.resultsBucket | quote }}
- name: MOSMEDAI_ARCHIVE_BUCKET
  value: {{ .Values.jobs.archiveBucket | quote }}
- name: MOSMEDAI_RETENTION_S
  value: {{ .Values.jobs.retentionSeconds | int64 | quote }}
- name: MOSMEDAI_DEID_UID_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "mosmedai.deidSecret" . }}
      key: {{ .Values.jobs.deidSecret.key }}
{{- end -}}

{{/* AWS_* credentials of the object store for the platform's jobs: the object-storage Secret. */}}
{{- define "mosmedai.objectStorageEnvFrom" -}}
envFrom:
  - secretRef:
      name: {{ include "mosmedai.objectStorageSecret" . }}
{{- end -}}

{{/* The tenants Secret, mounted read-only at /etc/mosmedai/tenants (volume and mount). */}}
{{- define "mosmedai.tenantsVolume" -}}
- name: tenants
  secret:
    secretName: {{ include "mosmedai.tenantsSecret" . }}
    defaultMode: 0440
    items:
      - {key: {{ include "mosmedai.tenantsKey" . }}, path: tenants.yaml}
{{- end -}}

{{- define "mosmedai.tenantsMount" -}}
- {name: tenants, mountPath: /etc/mosmedai/tenants, readOnly: true}
{{- end -}}

{{/* The per-region tool choice (values toolChoice; gateway and router pods). */}}
{{- define "mosmedai.toolsVolume" -}}
- name: tools
  configMap:
    name: {{ include "mosmedai.componentName" (dict "root" . "component" "tools") }}
    items:
      - {key: tools.yaml, path: tools.yaml}
{{- end -}}

{{- define "mosmedai.toolsMount" -}}
- {name: tools, mountPath: /etc/mosmedai/tools, readOnly: true}
{{- end -}}

{{/* The gateway Service's in-cluster URL (MOSMEDAI_GATEWAY_URL of DIMSE). */}}
{{- define "mosmedai.gatewayUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "mosmedai.componentName" (dict "root" . "component" "gateway")) .Release.Namespace .Values.gateway.service.port -}}
{{- end -}}

{{/* terminationGracePeriodSeconds of a draining server: preStop sleep + its own timeout +
     margin (values.yaml "graceful drain"). Argument: dict root, timeout (seconds). */}}
{{- define "mosmedai.gracePeriod" -}}
{{- $d := .root.Values.drain -}}
{{- add (int $d.endpointPropagationSeconds) (int .timeout) (int $d.killMarginSeconds) -}}
{{- end -}}
